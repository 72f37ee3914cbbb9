"""The fusion reproduction runs end to end in quick mode: quick ViT parents trained, every
section's figures printed, the headline last."""

import os

from launch import fusion_experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_vit_fusion_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert fusion_experiments.main(["--config", "configs/fusion_vit_mnist5k.py",
                                    "--root", str(tmp_path), "--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = dict(line.split("=", 1) for line in lines if "=" in line)
    for key in ("vit/vanilla/test_accuracy", "vit/ot_activations_sinkhorn/epsilon",
                "vit/weight_matching/test_loss", "vit/activation_matching/test_accuracy",
                "vit/curve/vanilla/test_accuracy",
                "vit/finetuned_ot_soft/better_than_both_parents"):
        assert key in figures, key
    assert len(figures["vit/curve/weight_matching/test_loss"].split(",")) == 2
    assert lines[-1].startswith("vit/headline_ot_soft_over_vanilla=")
    assert float(lines[-1].split("=")[1]) > 0
    assert sorted(os.listdir(tmp_path)) == ["quick_vit_finetune", "quick_vit_s0", "quick_vit_s1"]
