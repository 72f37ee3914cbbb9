"""Structured selection: BitFit, LN-tuning, lightweight and last-layer fine-tuning select exactly
their leaves on BERT, ViT and Llama naming, and only those get trainable state; HFT trains
exactly half of the blocks, a different half each round, reproducibly, the rest bit-identical
under the loop; GreenTrainer's step FLOPs (XLA) fall with the budget and stay within it; bad
options are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from research import methods, models, tree
from research.sparse import green, hft
from research.train import loop, optim
from tests.tiny_bert import random_params

SMALL = dict(hidden_size=16, num_heads=2, mlp_dim=32, num_layers=2, vocab_size=64, max_length=16,
             image_size=8, patch_size=4)
HEAD = ("classifier/", "lm_head/")


def _trained(name, shapes):
    method = methods.build(dict(name=name))
    mask = optim.trainable_mask(shapes, (), method.trainable_for(shapes))
    return {p for p, t in tree.flatten(mask).items() if t}


@pytest.mark.parametrize("model_name", ["bert_tiny_classifier", "vit_tiny_classifier",
                                        "llama_tiny_lm"])
def test_presets_select_their_leaves(model_name):
    shapes = models.build(model_name, **SMALL).param_shapes()
    paths = set(tree.flatten(shapes))
    head = {p for p in paths if p.startswith(HEAD)}
    stack = "decoder" if model_name.startswith("llama") else "encoder"
    expected = {
        "bitfit": {p for p in paths if p.endswith("/bias")},
        "ln_tuning": {p for p in paths if p.endswith(("norm/scale", "norm/bias"))},
        "lightweight": {p for p in paths if p.startswith("embeddings/")},
        "last_layer": {p for p in paths if p.startswith((f"{stack}/layer_1/",
                                                         f"{stack}/final_norm/"))},
    }
    for name, leaves in expected.items():
        if not leaves:  # Llama has no biases: BitFit would train nothing but the head
            with pytest.raises(ValueError, match=r"bitfit rule '\.\*/bias' matches no parameter"):
                _trained(name, shapes)
            continue
        assert _trained(name, shapes) == leaves | head, name
    extra = methods.build(dict(name="last_layer", also_train=(r"embeddings/.*",)))
    mask = tree.flatten(optim.trainable_mask(shapes, (), extra.trainable_for(shapes)))
    assert {p for p, t in mask.items() if t} == (expected["last_layer"] | head
                                                  | expected["lightweight"])


def _config(method, layers=2, mesh=None):
    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = dict(num_classes=2, vocab_size=100, hidden_size=32, num_heads=4,
                                  mlp_dim=64, num_layers=layers, hidden_dropout=0.0,
                                  attention_dropout=0.0)
    config.train.batch_size = 8
    config.optim.learning_rate = 1e-2
    config.optim.schedule = "constant"
    config.mesh = mesh or dict(data=1)
    config.method = method
    return config


def _batches(count, rows=8, length=16):
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(1, 100, (rows, length)).astype(np.int32),
             "attention_mask": np.ones((rows, length), np.int32),
             "token_type_ids": np.zeros((rows, length), np.int32),
             "label": rng.integers(0, 2, (rows,)).astype(np.int32)} for _ in range(count)]


def _train(method, steps=2):
    """``(before, after)`` params of ``steps`` loop steps from random params, and the setup."""
    config = _config(method)
    model = loop.build_model(config)
    setup = loop.make_setup(config, model, steps, devices=jax.devices()[:1])
    params = random_params(model)
    before = tree.flatten(jax.device_get(params))  # the step donates the buffers it is given
    trainable, frozen = tree.split(params, setup.trainable)
    state = jax.device_put({
        "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0)),
        "trainable": trainable, "frozen": frozen,
        "opt_state": jax.jit(setup.tx.init)(trainable)}, setup.state_shardings)
    step = loop.make_train_step(setup)
    for batch in _batches(steps):
        state, _ = step(state, loop.global_batch(setup, batch))
    after = tree.combine(*jax.device_get((state["trainable"], state["frozen"])))
    return before, tree.flatten(after), setup


def _changed(before, after):
    return {p for p in before if not np.array_equal(before[p], after[p])}


def test_presets_split_the_run_state():
    """Under the loop a preset's leaves are the trainable state, with Adam moments; the rest is
    frozen state without any (the step never writes it: HFT's run below checks bit for bit)."""
    for name in ("bitfit", "ln_tuning", "lightweight", "last_layer"):
        config = _config(dict(name=name))
        setup = loop.make_setup(config, loop.build_model(config), 2, devices=jax.devices()[:1])
        trained = {p for p, t in tree.flatten(setup.trainable).items() if t}
        assert trained == _trained(name, setup.model.param_shapes()), name
        state = setup.abstract_state
        assert set(tree.flatten(state["opt_state"][1].mu)) == trained, name
        assert set(tree.flatten(state["trainable"])) == trained, name
        assert set(tree.flatten(state["frozen"])) == set(tree.flatten(setup.trainable)) - trained


def test_hft_trains_exactly_half_of_the_blocks_a_new_half_each_round():
    shapes = loop.build_model(_config(None)).param_shapes()
    paths = list(tree.flatten(shapes))
    blocks = [b for group in hft.candidate_blocks(paths).values() for b in group]
    assert len(blocks) == 12  # 2 layers x (query, key, value, out, wi, wo)
    halves = [tuple(hft.draw_half(paths, seed=0, round=r)) for r in range(4)]
    assert all(len(h) == 6 for h in halves) and len(set(halves)) == 4
    assert tuple(hft.draw_half(paths, seed=0, round=1)) == halves[1]
    assert tuple(hft.draw_half(paths, seed=1, round=1)) != halves[1]
    for half in halves:  # per layer: two of four attention matrices, one of two MLP matrices
        for layer in ("layer_0", "layer_1"):
            assert sum(f"{layer}/attn/" in b for b in half) == 2
            assert sum(f"{layer}/mlp/" in b for b in half) == 1
    # Llama's three FFN matrices: one in a random half of the layers, two in the others.
    llama = list(tree.flatten(models.build("llama_tiny_lm", **SMALL).param_shapes()))
    half = hft.draw_half(llama, seed=0, round=0)
    assert sorted(sum(f"layer_{i}/mlp/" in b for b in half) for i in range(2)) == [1, 2]

    # Round 1 under the loop: exactly its blocks (kernel and bias) and the head change, every
    # other leaf stays bit-identical and has no optimizer state.
    before, after, setup = _train(dict(name="hft", round=1))
    changed = _changed(before, after)
    assert {p.rsplit("/", 1)[0] for p in changed} == set(halves[1]) | {"classifier"}
    assert set(tree.flatten(setup.abstract_state["opt_state"][1].mu)) == changed


def test_green_step_flops_fall_with_the_budget_and_stay_within_it():
    config = _config(dict(name="green", importance_batches=2), mesh=dict(data=-1))
    model = loop.build_model(config)
    profile = green.profile(config, random_params(model), _batches(2))
    plans = [green.choose(profile, budget) for budget in (0.9, 0.6, 0.4)]
    flops = [plan.flops for plan in plans]
    assert flops[0] >= flops[1] >= flops[2], flops
    for budget, plan in zip((0.9, 0.6, 0.4), plans):
        assert plan.flops <= budget * plan.full_flops and plan.trainable, (budget, plan.flops)
    assert len(plans[0].trainable) > len(plans[2].trainable)
    # The plan is what a run trains: the chosen tensors and the head.
    method = methods.build(dict(name="green", selected=plans[1].trainable))
    mask = optim.trainable_mask(model.param_shapes(), (),
                                method.trainable_for(model.param_shapes()))
    assert {p for p, t in tree.flatten(mask).items() if t} == {
        p.replace("\\", "") for p in plans[1].trainable} | {"classifier/kernel", "classifier/bias"}
    # Below the forward pass alone nothing fits.
    with pytest.raises(ValueError, match=r"flops_budget=0.2 is below .* of full fine-tuning$"):
        green.choose(profile, 0.2)


@pytest.mark.parametrize("config, message", [
    (dict(name="bitfit", biases=True), "config.method for 'bitfit'.*biases"),
    (dict(name="last_layer", also_train="pooler/.*"), "also_train for 'last_layer' must be a list"),
    (dict(name="hft", round=-1), r"config.method.round for 'hft' must be an integer >= 0"),
    (dict(name="green", flops_budget=0.0), r"flops_budget=0.0 must be in \(0, 1\]"),
    (dict(name="green", flops_budget=1.5), r"flops_budget=1.5 must be in \(0, 1\]"),
    (dict(name="green", importance_batches=0), "importance_batches=0 must be a positive"),
])
def test_bad_options_are_one_line_errors(config, message):
    with pytest.raises(ValueError, match=message) as info:
        methods.build(config)
    assert "\n" not in str(info.value)


def test_a_green_run_selects_in_prepare_from_its_own_params_and_batches(tmp_path):
    """``make_setup`` runs GreenTrainer.prepare: the plan ``select`` makes of the run's initial
    params and first training batches, nothing chosen when the config is loaded."""
    config = _config(dict(name="green", flops_budget=0.6, importance_batches=2),
                     mesh=dict(data=-1))
    config.model.overrides.vocab_size = 30522  # real WordPiece ids
    config.data.data_dir = str(tmp_path)
    config.data.options = dict(max_length=16)
    model = loop.build_model(config)
    setup = loop.make_setup(config, model, 3)
    batches = iter(loop.make_loader(config, "train", training=True, batch_size=8))
    expected = green.select(config, loop.model_params(config, model),
                            [next(batches) for _ in range(2)]).trainable
    assert setup.method.selected == expected and expected
    trained = {p for p, t in tree.flatten(setup.trainable).items() if t}
    assert trained == {p.replace("\\", "") for p in expected} | {"classifier/kernel",
                                                                  "classifier/bias"}


def test_green_without_a_plan_and_stale_rules_are_one_line_errors():
    shapes = models.build("bert_tiny_classifier", **SMALL).param_shapes()
    with pytest.raises(ValueError, match="config.method.selected is empty"):
        methods.build(dict(name="green")).trainable_for(shapes)
    with pytest.raises(ValueError, match=r"green rule 'encoder/layer_7/.*' matches no parameter"):
        methods.build(dict(name="green", selected=("encoder/layer_7/mlp/wi/kernel",))
                      ).trainable_for(shapes)
