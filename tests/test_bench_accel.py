"""The accelerator and compile-time benchmarks on tiny shapes: every figure is there, positive
and consistent with its definition (tokens/s, model FLOPs, MFU), PyTorch's steps run beside
Scion's, and a failing ``torch.compile`` is reported in one line without stopping the run."""

import math

import pytest
import torch

from launch import bench, bench_accel, bench_compile
from research import models

TINY = bench_accel.Settings(preset="llama_tiny", batch=2, length=32, rounds=1, warmup=1,
                            loss_chunk=16)
FAKE_PEAK = 1e12


def _llama_matmul_weights(vocab, hidden, layers, heads, kv_heads, head_dim, mlp, tied):
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    head = vocab * hidden  # the LM head (the embedding itself when tied); a lookup is no matmul
    return layers * (attention + 3 * hidden * mlp) + head


def test_matmul_weights_count_every_kernel_and_a_tied_head():
    tiny = models.build("llama_tiny_lm")
    assert bench_accel.matmul_weights(tiny) == _llama_matmul_weights(
        256, 64, 2, 4, 2, 16, 128, tied=False) == 90112
    assert bench_accel.matmul_weights(models.build("llama_1b_lm")) == _llama_matmul_weights(
        128256, 2048, 16, 32, 8, 64, 8192, tied=True) == 1_235_746_816
    assert bench_accel.model_flops(10, 3, "full") == 180.0
    assert bench_accel.model_flops(10, 3, "lora") == 120.0


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("cpu", None), ("NVIDIA GeForce RTX 4090", None)])
def test_spec_peaks_by_device_kind(kind, peak):
    assert bench_accel.spec_peak(kind) == peak


def test_flags_choose_the_settings():
    settings, args = bench_accel.parse(["--small", "--no-scan", "--remat", "full",
                                        "--loss_chunk", "0", "--out", "f.txt",
                                        "--torch_threads", "1"])
    assert (settings.preset, settings.batch, settings.length) == ("llama_tiny", 8, 128)
    assert (settings.scan, settings.remat, settings.loss_chunk) == (False, "full", 0)
    assert settings.torch_threads == 1
    assert args.out == "f.txt"
    default, _ = bench_accel.parse([])
    assert (default.preset, default.tokens, default.scan, default.attention, default.dtype) == (
        "llama_1b", 8 * 1024, True, "fused", "bfloat16")
    assert bench.main(["merge", "--small"]) == 2  # only accel and compile take options


def test_accel_figures_are_consistent(tmp_path, monkeypatch, capsys):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler\nhere")

    monkeypatch.setattr(torch, "compile", no_compiler)
    out = tmp_path / "figures.txt"
    values = bench_accel.run(TINY, bench_accel.Figures(str(out)), peak=FAKE_PEAK)

    # The file has every printed line, in order, ending with the headline.
    lines = out.read_text().splitlines()
    assert capsys.readouterr().out.splitlines()[-len(lines):] == lines
    assert [line.partition("=")[0] for line in lines] == list(values)
    assert lines[-1].startswith("scion_over_peft_tokens_per_s=")

    # torch.compile failed in one line per workload; the eager steps went on.
    assert values["peft_compile_error"] == "RuntimeError: no compiler here"
    assert values["torch_full_compile_error"] == "RuntimeError: no compiler here"
    assert values["torch_device"] == "cpu" and values["torch_precision"] == "float32"

    tokens = TINY.batch * TINY.length
    weights = values["matmul_weight_params"]
    assert values["tokens_per_step"] == tokens and weights == 90112
    assert values["scion_lora_trainable_params"] == values["peft_lora_trainable_params"] == (
        2 * 16 * (64 + 64) * 2 + 2 * 16 * (64 + 32) * 2 + 3 * 2 * 16 * (64 + 128))
    assert values["scion_full_trainable_params"] == values["torch_full_trainable_params"]
    for workload, factor in (("lora", 4), ("full", 6)):
        scion = f"scion_{workload}"
        flops = values[f"{scion}_model_flops"]
        assert flops == factor * weights * tokens
        for key in ("compile_seconds", "xla_flops", "compiled_bytes"):
            assert values[f"{scion}_{key}"] > 0, key
        assert f"{scion}_peak_bytes" not in values  # a CPU keeps no peak
        matmul = values[f"{workload}_matmul_flops_per_s"]
        for prefix in (scion, f"{bench_accel.PREFIXES[workload]}_eager"):
            seconds = values[f"{prefix}_step_seconds"]
            assert 0 < seconds < math.inf
            assert values[f"{prefix}_tokens_per_s"] == pytest.approx(tokens / seconds)
            assert values[f"{prefix}_mfu"] == pytest.approx(flops / seconds / FAKE_PEAK)
            assert values[f"{prefix}_mfu_matmul"] == pytest.approx(flops / seconds / matmul)
    assert values["scion_over_peft_tokens_per_s"] == pytest.approx(
        values["scion_lora_tokens_per_s"] / values["peft_lora_eager_tokens_per_s"])


def test_compile_seconds_of_a_tiny_step_in_and_out_of_process():
    spec = dict(model="llama_tiny_lm", num_layers=1, scan=True, batch=2, length=16,
                loss_chunk=0)
    for figures in (bench_compile.compile_seconds(**spec), bench_compile.in_subprocess(**spec)):
        assert figures["lower_seconds"] > 0 and figures["xla_seconds"] > 0
        assert figures["compile_seconds"] == pytest.approx(
            figures["lower_seconds"] + figures["xla_seconds"])
