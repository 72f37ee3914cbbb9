"""PELA as a tree transform: factorising at full rank changes nothing; at rank r the factors are
the best rank-r approximation (Eckart–Young); the distillation term is zero at full rank,
positive below it, and its gradient never reaches the teacher's kernels; compress() drops the
kernels and the parameter count falls by the expected amount; under the loop only the factors
train and the logged ``distill`` term falls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from research import methods, models, tree
from research.lowrank import pela as pela_lib
from research.lowrank.pela import PELA
from research.train import loop
from tests.tiny_bert import forward, random_batch

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=1, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0)
FULL = ((r"encoder/.*/kernel", 32),)  # 32 is every encoder kernel's smaller side
LOW = ((r"encoder/.*/mlp/.*/kernel", 4), (r"encoder/.*/attn/(query|out)/kernel", 6))


@pytest.fixture(scope="module")
def tiny():
    model = models.build("bert_tiny_encoder", **TINY)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32),
                          model.param_shapes())
    ids = rng.integers(1, 100, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    return model, params, (ids, mask, np.zeros_like(ids))


def distill(model, method, params, ids, mask, types):
    return method.apply(model.module, {"params": params}, ids, mask, types,
                        deterministic=False).losses["distill"]


distill_value = jax.jit(distill, static_argnums=(0, 1))
distill_grad = jax.jit(jax.grad(distill, argnums=2), static_argnums=(0, 1))


def test_full_rank_factors_reproduce_the_model(tiny):
    model, params, batch = tiny
    method = PELA(targets=FULL)
    student = method.init(jax.random.key(0), params)
    flat = tree.flatten(student)
    assert flat["encoder/layer_0/attn/query/pela_u"].shape == (32, 32)
    assert flat["encoder/layer_0/attn/query/pela_v"].shape == (32, 4, 8)   # [r, heads, hd]
    assert flat["encoder/layer_0/attn/out/pela_u"].shape == (4, 8, 32)     # [heads, hd, r]
    assert flat["encoder/layer_0/mlp/wo/pela_v"].shape == (32, 32)
    base, ours = forward(model, None, params, *batch), forward(model, method, student, *batch)
    for x, y in zip(base, ours):
        np.testing.assert_allclose(x, y, atol=2e-4)


@pytest.mark.parametrize("path,n_in", [("encoder/layer_0/mlp/wi/kernel", 1),
                                       ("encoder/layer_0/attn/out/kernel", 2)])
def test_rank_r_factors_are_the_best_rank_r_approximation(tiny, path, n_in):
    _, params, _ = tiny
    kernel = np.asarray(tree.flatten(params)[path], np.float64)
    u, v = pela_lib.factorise(jnp.asarray(kernel, jnp.float32), 5, n_in)
    error = (kernel - np.tensordot(np.asarray(u, np.float64), np.asarray(v, np.float64), 1))
    matrix = kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1)
    singular = np.linalg.svd(matrix, compute_uv=False)
    # Eckart–Young: Frobenius error² is the tail energy, spectral error the next value.
    assert np.sum(error ** 2) == pytest.approx(np.sum(singular[5:] ** 2), rel=1e-4)
    assert np.linalg.norm(error.reshape(matrix.shape), 2) == pytest.approx(singular[5], rel=1e-4)
    # sqrt(S) on each side: the two factors carry the same energy.
    assert np.linalg.norm(u) == pytest.approx(np.linalg.norm(v), rel=1e-4)


def test_distillation_is_zero_at_full_rank_and_only_trains_the_student(tiny):
    model, params, batch = tiny
    full = PELA(targets=FULL, distill_weight=2.0)
    assert float(distill_value(model, full, full.init(None, params), *batch)) < 1e-8

    low = PELA(targets=LOW, distill_weight=2.0)
    student = low.init(None, params)
    value = float(distill_value(model, low, student, *batch))
    assert value > 1e-3
    grads = tree.flatten(distill_grad(model, low, student, *batch))
    for path in low.plan(params):                 # the teacher's kernels get no gradient
        assert not np.any(grads[path]), path
        module = path.rpartition("/")[0]
        assert np.abs(grads[f"{module}/pela_u"]).max() > 0, module
        assert np.abs(grads[f"{module}/pela_v"]).max() > 0, module
    assert list(low.sites(params)) == ["encoder/layer_0"]
    # distill_sites choose (and weigh) where the term is taken, distill_weight scales it.
    two = PELA(targets=LOW, distill_weight=1.0, distill_sites=(
        (r"encoder/layer_0", 3.0), (r"encoder/layer_0/attn", 1.0)))
    assert two.sites(params) == {"encoder/layer_0": 3.0, "encoder/layer_0/attn": 1.0}
    attn = PELA(targets=LOW, distill_weight=1.0, distill_sites=((r".*/attn", 1.0),))
    attn_only = float(distill_value(model, attn, student, *batch))
    assert float(distill_value(model, two, student, *batch)) == pytest.approx(
        (3.0 * value / 2.0 + attn_only) / 4.0, rel=1e-5)


def test_compress_drops_the_kernels_and_counts_the_saving(tiny):
    model, params, batch = tiny
    method = PELA(targets=LOW)
    student = method.init(None, params)
    compressed = pela_lib.compress(student)
    plan = method.plan(params)
    flat = tree.flatten(compressed)
    assert not any(path in flat for path in plan)
    assert "encoder/layer_0/attn/key/kernel" in flat and "encoder/layer_0/mlp/wi/bias" in flat
    saved = 0
    for path, (rank, n_in) in plan.items():
        shape = tree.flatten(params)[path].shape
        fan_in, fan_out = np.prod(shape[:n_in]), np.prod(shape[n_in:])
        saved += fan_in * fan_out - rank * (fan_in + fan_out)
    counts = pela_lib.parameter_counts(student)
    assert counts["original"] == tree.count(params)
    assert counts["original"] - counts["compressed"] == saved > 0
    # The deployable tree runs as the student did, without its kernels.
    np.testing.assert_allclose(forward(model, method, compressed, *batch)[0],
                               forward(model, method, student, *batch)[0], atol=1e-6)
    with pytest.raises(ValueError, match="needs the teacher kernel encoder/layer_0/.*/kernel"):
        method.apply(model.module, {"params": compressed}, *batch, deterministic=False)


def test_bad_input_is_a_one_line_error(tiny):
    _, params, _ = tiny
    assert isinstance(methods.build(dict(name="pela", targets=LOW)), PELA)
    with pytest.raises(ValueError, match=r"PELA target rule 'encoder/.*/kernal' matches no "
                                         r"parameter; closest"):
        PELA(targets=((r"encoder/.*/kernal", 4),)).plan(params)
    with pytest.raises(ValueError, match=r"PELA rank for encoder/layer_0/mlp/wi/kernel: 40 "
                                         r"must be an integer in \[1, 32\]"):
        PELA(targets=((r".*/wi/kernel", 40),)).plan(params)
    with pytest.raises(ValueError, match=r"PELA distill site rule 'decoder/.*' matches no"):
        PELA(targets=LOW, distill_sites=((r"decoder/.*", 1.0),)).sites(params)
    with pytest.raises(ValueError, match="config.method for 'pela'.*rank"):
        methods.build(dict(name="pela", targets=LOW, rank=4))


def _loop_setup(method):
    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = dict(num_classes=2, vocab_size=1000, hidden_size=32, num_heads=4,
                                  mlp_dim=64, num_layers=1, hidden_dropout=0.0,
                                  attention_dropout=0.0, initializer_range=0.2)
    config.train.batch_size = 8
    config.optim.learning_rate = 3e-3
    config.optim.schedule = "constant"
    config.mesh = dict(data=1)
    config.method = method
    return config, loop.make_setup(config, loop.build_model(config), 10,
                                   devices=jax.devices()[:1])


def test_training_under_the_loop_reduces_the_distill_term():
    config, setup = _loop_setup(dict(name="pela", targets=LOW, distill_weight=10.0,
                                     also_train=(r"classifier/.*",)))
    state = loop.init_state(config, setup)
    trainable = tree.flatten(state["trainable"])
    assert set(trainable) == {p for p in trainable if p.endswith(("pela_u", "pela_v"))} | {
        "classifier/kernel", "classifier/bias"}
    assert "encoder/layer_0/mlp/wi/kernel" in tree.flatten(state["frozen"])
    batch = random_batch(setup)
    step = loop.make_train_step(setup)
    distill = []
    for _ in range(6):
        state, sums = step(state, batch)
        distill.append(float(sums["distill"] / sums["count"]))
    assert distill[0] > 0 and np.all(np.diff(distill) < 0) and distill[-1] < 0.85 * distill[0], \
        distill
