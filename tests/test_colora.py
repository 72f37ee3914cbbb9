"""CoLoRA: the allocation sums exactly to the budget, is proportional and monotone in the scores
and respects the bounds; its rules round-trip into LoRA.plan and through the JSON file into the
config; the contribution score is the squared norm of the mean gradient (a kernel with a larger
gradient ranks higher); bad budgets and a missing file are one-line errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import minilm_colora
from research import models, tree
from research.lowrank import colora
from research.lowrank.lora import LoRA
from research.train import loop

KERNELS = ((r"encoder/.*/kernel", 8),)


def scores_for(n, seed=0):
    rng = np.random.default_rng(seed)
    return {f"k{i}": float(s) for i, s in enumerate(rng.gamma(1.0, 1.0, n))}


@pytest.mark.parametrize("budget", [12, 37, 100, 180])
def test_allocation_sums_to_the_budget_within_bounds_in_proportion(budget):
    scores = scores_for(12)
    ranks = colora.allocate(scores, budget, min_rank=1, max_rank=16)
    assert sum(ranks.values()) == budget
    assert all(1 <= r <= 16 for r in ranks.values())
    for a in scores:
        for b in scores:
            if scores[a] > scores[b]:
                assert ranks[a] >= ranks[b], (a, b)
    # Unclipped kernels are within one of their proportional share λ·score.
    free = [p for p, r in ranks.items() if 1 < r < 16]
    if len(free) > 1:
        ratios = [ranks[p] / scores[p] for p in free]
        lam = np.median(ratios)
        assert all(abs(ranks[p] - lam * scores[p]) < 1 + 1e-9 for p in free)


def test_allocation_is_monotone_in_a_kernels_own_score_and_caps_spill_over():
    scores = scores_for(8, seed=1)
    base = colora.allocate(scores, 40, min_rank=0, max_rank=12)
    for factor in (1.5, 3.0, 10.0):
        raised = colora.allocate({**scores, "k3": scores["k3"] * factor}, 40, min_rank=0,
                                 max_rank=12)
        assert raised["k3"] >= base["k3"]
        assert sum(raised.values()) == 40
    # A dominant kernel stops at its own cap; the rest share what it cannot take.
    capped = colora.allocate({**scores, "k0": 1e6}, 40, min_rank=0,
                             max_rank={**dict.fromkeys(scores, 12), "k0": 5})
    assert capped["k0"] == 5 and sum(capped.values()) == 40
    # clip(λ·score, min, max): λ = 1.25 gives 1.25, 1 (the minimum), 3.75; the remainder's
    # unit goes to c. Zero scores get the minimum unless the others cannot take the budget.
    zero = colora.allocate({"a": 1.0, "b": 0.0, "c": 3.0}, 6, min_rank=1, max_rank=8)
    assert zero == {"a": 1, "b": 1, "c": 4}
    full = colora.allocate({"a": 1.0, "b": 0.0}, 7, min_rank=0, max_rank=4)
    assert full == {"a": 4, "b": 3}


def test_bad_budget_and_bounds_are_one_line_errors():
    scores = scores_for(4)
    with pytest.raises(ValueError, match=r"CoLoRA budget 7 is outside \[8, 64\]: 4 kernels") as e:
        colora.allocate(scores, 7, min_rank=2, max_rank=16)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"CoLoRA budget 65 is outside \[8, 64\]"):
        colora.allocate(scores, 65, min_rank=2, max_rank=16)
    with pytest.raises(ValueError, match=r"rank bounds for 'k0': need 0 <= min_rank \(5\) <= "
                                         r"max_rank \(4\)"):
        colora.allocate(scores, 16, min_rank=5, max_rank=4)
    with pytest.raises(ValueError, match=r"max_rank has no entry for 'k1'"):
        colora.allocate(scores, 8, max_rank={"k0": 4})
    with pytest.raises(ValueError, match=r"scores must be finite and >= 0"):
        colora.allocate({"a": -1.0}, 1, max_rank=2)


def test_rules_round_trip_into_lora_plan_and_through_the_file(tmp_path):
    model = models.build("bert_tiny_encoder", hidden_size=32, num_heads=4, mlp_dim=64,
                         num_layers=2, vocab_size=100, max_length=32)
    shapes = model.param_shapes()
    kernels = list(LoRA(targets=KERNELS).plan(shapes))
    scores = {p: float(i % 5) for i, p in enumerate(kernels)}  # some zeros -> rank 0
    ranks = colora.allocate(scores, 30, min_rank=0, max_rank=8)
    assert 0 in ranks.values()
    rules = colora.target_rules(ranks)
    plan = LoRA(targets=rules).plan(shapes)
    assert {p: t.rank for p, t in plan.items()} == {p: r for p, r in ranks.items() if r}

    out = tmp_path / "colora" / "targets.json"
    colora.write(str(out), ranks, scores, budget=30)
    assert os.listdir(out.parent) == ["targets.json"]  # no temporary file left behind
    assert colora.read_targets(str(out)) == rules
    assert json.loads(out.read_text())["budget"] == 30


def test_contribution_is_the_squared_norm_of_the_mean_gradient():
    rng = np.random.default_rng(0)
    params = {"small": {"kernel": jnp.ones((4, 3))}, "large": {"kernel": jnp.ones((4, 3))},
              "other": {"bias": jnp.ones((3,))}}

    def loss_fn(p, batch):
        x = batch["x"]
        return jnp.mean(x @ p["small"]["kernel"] + 3.0 * x @ p["large"]["kernel"]
                        + p["other"]["bias"])

    x = rng.normal(size=(2, 5, 4)).astype(np.float32)
    scores = jax.jit(lambda p, b: colora.contribution(
        loss_fn, p, b, ("small/kernel", "large/kernel")))(params, {"x": x})
    assert set(scores) == {"small/kernel", "large/kernel"}
    mean_x = x.mean(axis=(0, 1))
    expected = np.sum(np.outer(mean_x, np.ones(3) / 3) ** 2)  # d mean(x·W) / dW, batch-averaged
    np.testing.assert_allclose(scores["small/kernel"], expected, rtol=1e-5)
    np.testing.assert_allclose(scores["large/kernel"], 9 * expected, rtol=1e-5)
    ranks = colora.allocate(scores, 5, min_rank=1, max_rank=4)
    assert ranks == {"small/kernel": 1, "large/kernel": 4}
    # Gradients that cancel across batches contribute nothing: the step is on their mean.
    opposite = colora.contribution(loss_fn, params, {"x": np.stack([x[0], -x[0]])},
                                   ("small/kernel",))
    assert float(opposite["small/kernel"]) < 1e-12
    with pytest.raises(ValueError, match=r"candidate 'smal/kernel' is not a parameter; "
                                         r"closest: small/kernel"):
        colora.contribution(loss_fn, params, {"x": x}, ("smal/kernel",))


def test_config_reads_the_file_or_says_to_run_the_cli(tmp_path):
    missing = str(tmp_path / "none.json")
    with pytest.raises(FileNotFoundError, match=r"run python -m launch.colora --config "
                                                r"configs/minilm_lora.py .*--out .*none.json "
                                                r"first") as info:
        minilm_colora.get_config(f"targets={missing}")
    assert "\n" not in str(info.value)

    minilm = models.build("minilm_l6_classifier", num_classes=2)
    kernels = list(LoRA(targets=KERNELS).plan(minilm.param_shapes()))
    ranks = colora.allocate({p: float(i + 1) for i, p in enumerate(kernels)}, 288,
                            max_rank=384)
    path = str(tmp_path / "targets.json")
    colora.write(path, ranks, dict.fromkeys(kernels, 1.0))
    config = minilm_colora.get_config(f"targets={path},quick")
    assert config.method.name == "lora" and config.train.steps == 4
    setup = loop.make_setup(config, loop.build_model(config), 4, devices=jax.devices()[:1])
    shapes = tree.flatten(setup.abstract_state["trainable"])
    for kernel, rank in ranks.items():
        assert shapes[kernel.replace("kernel", "lora_a")].shape[-1] == rank
    adapted = jax.eval_shape(setup.method.init, jax.random.key(0), minilm.param_shapes())
    assert set(tree.flatten(setup.method.scales(adapted)).values()) == {minilm_colora.SCALE}
