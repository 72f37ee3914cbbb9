"""Learned masks. Grafting: the starting mask is the top-s entries by movement; with γ binary
the model is θft inside the mask and θpre outside, bit for bit; under the loop only the scores
change. Mask tuning (on a three-Dense toy model, cheap to compile): the forward uses exactly the
binary mask and keeps the pretrained entries bit for bit; the scores' gradient is the masked
weight's (straight-through); gradient dropout keeps each entry with the paper's probability and
leaves the head's gradient alone. Bad options: one-line errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from research import methods, tree
from research.sparse import learned_masks as lm
from research.sparse import masks as masks_lib
from research.sparse.learned_masks import Graft, MaskTuning
from research.train import checkpoint, loop, optim

SHAPES = dict(num_classes=2, vocab_size=200, hidden_size=16, num_heads=2, mlp_dim=32,
              num_layers=1, hidden_dropout=0.0, attention_dropout=0.0)
ROWS, LENGTH = 4, 8


def _config(method):
    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = SHAPES
    config.train.batch_size = ROWS
    config.optim.name = "sgd"
    config.optim.momentum = 0.0
    config.optim.learning_rate = 1e3  # moves the scores of a tiny model in one step
    config.optim.schedule = "constant"
    config.optim.grad_clip_norm = 0.0
    config.mesh = dict(data=1)
    config.method = method
    return config


def _random(shapes, seed, scale=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32),
                        shapes)


def _save_run(workdir: str, params) -> str:
    """A finished run's checkpoint holding ``params`` (what ``final_params`` reads)."""
    manager = checkpoint.make_manager(workdir, async_save=False)
    trainable, frozen = tree.split(params, tree.mask_from_patterns([r"classifier/.*"], params))
    checkpoint.save(manager, 7, {"trainable": trainable, "frozen": frozen}, None, force=True)
    manager.close()
    return workdir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The loop's model, θpre and θft, and runs holding each (θpre: ``init_from``, so the loop
    compiles no random init)."""
    model = loop.build_model(_config(dict(name="full")))
    pre, finetuned = (_random(model.param_shapes(), seed) for seed in (0, 1))
    runs = {name: _save_run(str(tmp_path_factory.mktemp(name)), params)
            for name, params in (("pretrained", pre), ("finetuned", finetuned))}
    return model, pre, finetuned, runs


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((ROWS, LENGTH), np.int32)
    mask[1, 5:] = 0
    return dict(input_ids=jnp.asarray(rng.integers(1, 200, (ROWS, LENGTH)), jnp.int32),
                attention_mask=jnp.asarray(mask),
                token_type_ids=jnp.zeros((ROWS, LENGTH), jnp.int32))


def _trees_equal(a, b):
    tree.check_same_structure(a, b)
    for path, value in tree.flatten(a).items():
        np.testing.assert_array_equal(np.asarray(tree.flatten(b)[path]), np.asarray(value),
                                      err_msg=path)


# What ``prepare`` reads: a fine-tuning run's exported checkpoint, as the loop gives it.
READER = methods.Context(None, None, None, None, loop.exported_params)


# ---------------------------------------------------------------------------------------------
# Grafting
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grafted(tiny):
    _, pre, _, runs = tiny
    method = Graft(finetuned=runs["finetuned"], density=0.03).prepare(READER)
    return method, jax.jit(method.init)(jax.random.key(0), pre)


def test_graft_starts_from_the_top_entries_by_movement(tiny, grafted):
    _, pre, finetuned, _ = tiny
    method, params = grafted
    flat, flat_pre, flat_ft = tree.flatten(params), tree.flatten(pre), tree.flatten(finetuned)

    movement = {p: np.asarray(flat_ft[p]) - np.asarray(v) for p, v in flat_pre.items()}
    expected = masks_lib.top_k(movement, density=0.03, rules=lm.DEFAULT_GRAFT)
    _, mask = method.binarise(params)
    _trees_equal(mask, expected)
    assert masks_lib.count(mask, pre) == int(0.03 * tree.count(tree.unflatten(
        {p: v for p, v in flat_pre.items() if not p.startswith("classifier/")})))
    # The head comes whole from θft; every other model leaf is θpre; θft waits beside.
    for path, value in flat_pre.items():
        want = flat_ft[path] if path.startswith("classifier/") else value
        np.testing.assert_array_equal(flat[path], want, err_msg=path)
        if not path.startswith("classifier/"):
            np.testing.assert_array_equal(flat[f"graft_finetuned/{path}"], flat_ft[path])
            assert set(np.unique(flat[f"graft_score/{path}"])) <= {-10.0, 10.0}
    assert "graft_score/classifier/kernel" not in flat
    trainable = tree.flatten(optim.trainable_mask(params, (), method.trainable))
    assert {p for p, t in trainable.items() if t} == {p for p in flat
                                                      if p.startswith("graft_score/")}


def test_binary_gamma_grafts_finetuned_entries_exactly(tiny, grafted):
    _, pre, finetuned, _ = tiny
    method, params = grafted
    params = dict(tree.flatten(params))
    rng = np.random.default_rng(3)
    chosen = {}
    for path in [p for p in params if p.startswith("graft_score/")]:
        chosen[path] = rng.random(params[path].shape) < 0.3
        params[path] = jnp.where(chosen[path], jnp.inf, -jnp.inf)  # σ: exactly 1 and 0
    params = tree.unflatten(params)

    relaxed = jax.jit(method.relaxed)(params)  # what the model runs with in the step
    binary, mask = method.binarise(params)
    for path, value in tree.flatten(relaxed).items():
        if f"graft_score/{path}" in chosen:
            want = np.where(chosen[f"graft_score/{path}"], tree.flatten(finetuned)[path],
                            tree.flatten(pre)[path])
            np.testing.assert_array_equal(value, want, err_msg=path)
            np.testing.assert_array_equal(tree.flatten(mask)[path],
                                          chosen[f"graft_score/{path}"])
    _trees_equal(relaxed, binary)


def test_graft_training_moves_only_the_scores(tiny):
    model, pre, finetuned, runs = tiny
    config = _config(dict(name="graft", finetuned=runs["finetuned"], density=0.05))
    config.model.init_from = runs["pretrained"]
    setup = loop.make_setup(config, model, 4, devices=jax.devices()[:1])
    state = loop.init_state(config, setup)
    before = jax.device_get(state)
    assert all(p.startswith("graft_score/") for p in tree.flatten(before["trainable"]))
    frozen = tree.flatten(before["frozen"])
    for path, value in tree.flatten(pre).items():
        source = finetuned if path.startswith("classifier/") else pre
        np.testing.assert_array_equal(frozen[path], tree.flatten(source)[path], err_msg=path)

    batch = loop.global_batch(setup, {**_batch(), "label": np.array([0, 1, 1, 0], np.int32)})
    state, sums = loop.make_train_step(setup)(state, batch)
    after = jax.device_get(state)
    assert float(sums["graft_density"]) / float(sums["count"]) == pytest.approx(0.05, abs=2e-3)
    _trees_equal(after["frozen"], before["frozen"])
    moved = [p for p, v in tree.flatten(after["trainable"]).items()
             if np.any(v != tree.flatten(before["trainable"])[p])]
    assert moved


def test_graft_bad_options_are_one_line_errors(tiny, tmp_path):
    _, pre, _, runs = tiny
    workdir = runs["finetuned"]
    cases = [
        (lambda: Graft(), "Graft needs finetuned"),
        (lambda: Graft(finetuned=workdir, density=0.0), r"Graft density=0.0 is outside"),
        (lambda: Graft(finetuned=workdir, density=1.5), r"Graft density=1.5 is outside"),
        (lambda: Graft(finetuned=workdir, sigmoid_bias=-1.0), "sigmoid_bias=-1.0 is not"),
        (lambda: Graft(finetuned=workdir, graft=((r"encoder/.*/kernal", True),)).plan(pre),
         r"Graft graft rule 'encoder/.*/kernal' matches no parameter; closest: "),
        (lambda: Graft(finetuned=workdir, graft=((r"pooler/.*", False),)).plan(pre),
         r"Graft graft rules \[\('pooler/\.\*', False\)\] select no leaf"),
        (lambda: Graft(finetuned=workdir, head=(r"pooler/.*",)).plan(pre),
         r"'pooler/bias' is both grafted and head"),
        (lambda: Graft(finetuned=str(tmp_path)).prepare(READER), "has no checkpoints folder"),
        (lambda: Graft(finetuned=workdir).init(jax.random.key(0), pre),
         r"Graft has not read θft .*; prepare it"),
        (lambda: Graft(finetuned=workdir).prepare(READER).init(jax.random.key(0), _random(
            loop.build_model(_config(dict(name="full"))).param_shapes() | {
                "classifier": {"kernel": jax.ShapeDtypeStruct((16, 3), jnp.float32),
                               "bias": jax.ShapeDtypeStruct((3,), jnp.float32)}}, 0)),
         r"'classifier/bias' has shape \(2,\), the model \(3,\)"),
        (lambda: methods.build(dict(name="graft", finetuned=workdir, sparsity=0.1)),
         r"config.method for 'graft'.*sparsity"),
    ]
    for make, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
            make()
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Regularized mask tuning
# ---------------------------------------------------------------------------------------------


class _Toy(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        del deterministic
        h = jnp.tanh(nn.Dense(16, name="hidden")(x))
        h = jnp.tanh(nn.Dense(16, name="middle")(h))
        return nn.Dense(3, name="classifier")(h)


TOY = _Toy()
TOY_MASKED = ((r"(hidden|middle)/kernel", True),)
# One compiled gradient per method, shared by the tests below.
PLAIN = MaskTuning(masked=TOY_MASKED, gdr_lambda=0.0, norm_weight=0.0)
GDR = MaskTuning(masked=TOY_MASKED, norm_weight=0.0)
INPUTS = jnp.asarray(np.random.default_rng(5).normal(size=(64, 8)), jnp.float32)
LABELS = jnp.asarray(np.random.default_rng(6).integers(0, 3, 64))


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(7)
    shapes = {"hidden": (8, 16), "middle": (16, 16), "classifier": (16, 3)}
    return {name: {"kernel": jnp.asarray(rng.normal(0, 0.5, shape), jnp.float32),
                   "bias": jnp.asarray(rng.normal(0, 0.1, shape[1:]), jnp.float32)}
            for name, shape in shapes.items()}


def _with_scores(pre, shift=0.0, seed=4):
    """``pre`` with scores spread around ``threshold + shift``."""
    params = dict(tree.flatten(PLAIN.init(jax.random.key(0), pre)))
    rng = np.random.default_rng(seed)
    for path in [p for p in params if p.startswith("mask_score/")]:
        params[path] = jnp.asarray(
            PLAIN.threshold + shift + rng.normal(0, 1e-2, params[path].shape), jnp.float32)
    return tree.unflatten(params)


def _loss(method, params, rng):
    logits, terms, _ = method.apply(TOY, {"params": params}, INPUTS,
                                    deterministic=False, rngs={"dropout": rng})
    task = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), LABELS[:, None], 1))
    return task + sum(terms.values())


@functools.partial(jax.jit, static_argnums=0)
def _grads(method, params, rng):
    return jax.grad(functools.partial(_loss, method))(params, rng)


@jax.jit
def _plain_forward(params):
    return TOY.apply({"params": params}, INPUTS)


def test_mask_tuning_forward_uses_exactly_the_binary_mask(toy):
    params = _with_scores(toy)
    flat = tree.flatten(params)
    scored = [p.removeprefix("mask_score/") for p in flat if p.startswith("mask_score/")]
    assert scored == ["hidden/kernel", "middle/kernel"]
    masked = dict(tree.flatten(toy))
    for path in scored:
        masked[path] = np.where(flat[f"mask_score/{path}"] > PLAIN.threshold, masked[path], 0.0)
    masked = tree.unflatten(masked)
    # Kept entries are the pretrained ones bit for bit, masked ones zero, other leaves as given.
    _trees_equal(jax.jit(PLAIN.masked_params)(params), masked)
    np.testing.assert_array_equal(
        jax.jit(lambda p: PLAIN.apply(TOY, {"params": p}, INPUTS).outputs)(params),
        _plain_forward(masked))
    assert 0.3 < float(PLAIN.sparsity(params)) < 0.7
    _trees_equal(PLAIN.masks(params), tree.map_with_path(
        lambda p, v: np.asarray(flat[f"mask_score/{p}"] > PLAIN.threshold)
        if p in scored else False, toy))


def test_scores_get_the_masked_weights_gradient_through_the_straight_through_estimator(toy):
    params = _with_scores(toy)
    grads = tree.flatten(_grads(PLAIN, params, jax.random.key(0)))

    def through_weights(weights):
        logits = TOY.apply({"params": weights}, INPUTS)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), LABELS[:, None], 1))

    weight_grads = tree.flatten(jax.jit(jax.grad(through_weights))(
        jax.jit(PLAIN.masked_params)(params)))
    flat_pre = tree.flatten(toy)
    for path in [p for p in grads if p.startswith("mask_score/")]:
        target = path.removeprefix("mask_score/")
        np.testing.assert_allclose(grads[path], weight_grads[target] * flat_pre[target],
                                   rtol=1e-5, atol=1e-9, err_msg=path)
        off = np.asarray(tree.flatten(params)[path]) <= PLAIN.threshold
        assert np.abs(grads[path][off]).max() > 0  # masked-off entries still learn


def test_gradient_dropout_keeps_entries_with_the_papers_probability():
    ga = jnp.asarray(np.random.default_rng(0).normal(size=(50_000,)), jnp.float32)
    key, dropout = jax.random.key(1), jax.jit(lm.gradient_dropout, static_argnums=3)
    for gb, zeroed in ((ga, 0.0), (jnp.zeros_like(ga), 0.0), (-ga, 0.5), (-3 * ga, 0.75)):
        out = dropout(key, {"s": ga}, {"s": gb}, 1.0)["s"]
        kept = np.asarray(out != 0)
        assert 1 - kept.mean() == pytest.approx(zeroed, abs=0.01)
        np.testing.assert_array_equal(out[kept], ga[kept])
    half = dropout(key, {"s": ga}, {"s": -ga}, 0.5)["s"]
    np.testing.assert_allclose(np.unique(np.round(half / ga, 6)), [0.5, 1.0])


def test_gradient_dropout_in_the_step(toy):
    """The scores' gradient is the plain one with entries zeroed at the paper's rate, decided
    by the distillation gradient towards the unmasked model; the head's is untouched."""
    params = _with_scores(toy, shift=-0.01)  # most entries masked: far from the teacher
    rng = jax.random.key(2)
    dropped, full = (tree.flatten(_grads(m, params, rng)) for m in (GDR, PLAIN))
    teacher = _plain_forward(toy)

    def distill(p):
        return lm.distillation_loss(PLAIN.apply(TOY, {"params": p}, INPUTS).outputs, teacher)

    toward = tree.flatten(jax.jit(jax.grad(distill))(params))
    zeroed, expected = [], []
    for path in [p for p in full if p.startswith("mask_score/")]:
        ga, gb, got = full[path], toward[path], dropped[path]
        kept = got != 0
        np.testing.assert_allclose(got[kept], ga[kept], rtol=1e-4, atol=1e-12, err_msg=path)
        zeroed.append(~kept.ravel())
        keep_p = (np.sign(ga) * (ga + gb) / (np.abs(ga) + np.abs(gb) + 1e-8) + 1) / 2
        expected.append(1 - keep_p.ravel())
    zeroed, expected = np.concatenate(zeroed), np.concatenate(expected)
    sigma = np.sqrt(np.sum(expected * (1 - expected))) / expected.size
    assert expected.mean() > 0.1
    assert abs(zeroed.mean() - expected.mean()) < 4 * sigma, (zeroed.mean(), expected.mean())
    for path in ("classifier/kernel", "classifier/bias"):
        np.testing.assert_allclose(dropped[path], full[path], rtol=1e-5, atol=1e-9)


def test_mask_tuning_bad_options_are_one_line_errors(tiny):
    _, pre, _, _ = tiny
    cases = [
        (lambda: MaskTuning(init_score=1e-3), r"init_score=0.001 must exceed threshold"),
        (lambda: MaskTuning(gdr_lambda=1.5), r"gdr_lambda=1.5 is not in \[0, 1\]"),
        (lambda: MaskTuning(temperature=0.0), "temperature=0.0 is not positive"),
        (lambda: MaskTuning(norm_weight=-1.0), "norm_weight=-1.0 is negative"),
        (lambda: MaskTuning(masked=((r"encoder/.*/kernal", True),)).plan(pre),
         r"MaskTuning masked rule 'encoder/.*/kernal' matches no parameter; closest: "),
        (lambda: MaskTuning(masked=((r"encoder/.*/kernel", 0.5),)).plan(pre),
         r"value 0.5 is not True or False"),
        (lambda: MaskTuning(masked=((r".*kernel", True),)).plan(pre),
         r"'classifier/kernel' is both masked and in also_train"),
        (lambda: methods.build(dict(name="mask_tuning", drop_rate=0.1)),
         r"config.method for 'mask_tuning'.*drop_rate"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            make()
        assert "\n" not in str(info.value)
