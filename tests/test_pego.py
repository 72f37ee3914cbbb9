"""PEGO as a tree transform: the layer's update is the sum of its K LoRA modules' updates; a
fresh group changes nothing; the regulariser is zero exactly when the modules are orthogonal
(to the pretrained weight and each other, or orthonormal A blocks for 'gram'), matches the
authors' formula, and optimising it drives the A blocks' Gram matrix to the identity; under the
loop a step logs ``orthogonality``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import methods, models, tree
from research.lowrank import lora as lora_lib
from research.lowrank.pego import PEGO
from research.train import loop
from tests.tiny_bert import forward, loop_config, loop_setup, random_batch

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=1, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0)
METHOD = PEGO(targets=((r"encoder/.*/attn/(query|out)/kernel", 2),
                       (r"encoder/.*/mlp/wi/kernel", 3)), modules=3, alpha=4.0)


@pytest.fixture(scope="module")
def tiny():
    model = models.build("bert_tiny_encoder", **TINY)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32),
                          model.param_shapes())
    ids = rng.integers(1, 100, (3, 12)).astype(np.int32)
    return model, params, (ids, np.ones_like(ids), np.zeros_like(ids))


def test_update_is_the_sum_of_the_modules_updates(tiny):
    model, params, batch = tiny
    grouped = METHOD.init(jax.random.key(0), params)
    flat = tree.flatten(grouped)
    assert flat["encoder/layer_0/attn/query/lora_a"].shape == (32, 3 * 2)
    assert flat["encoder/layer_0/attn/out/lora_a"].shape == (4, 8, 3 * 2)
    assert flat["encoder/layer_0/mlp/wi/lora_b"].shape == (3 * 3, 64)
    # B = 0: the fresh group leaves the model's function unchanged.
    base = forward(model, None, params, *batch)
    np.testing.assert_allclose(forward(model, METHOD, grouped, *batch)[0], base[0], atol=1e-6)

    rng = np.random.default_rng(1)
    flat = {p: jnp.asarray(rng.normal(0.0, 0.3, x.shape), jnp.float32)
            if p.endswith(("lora_a", "lora_b")) else x for p, x in flat.items()}
    merged = dict(flat)
    for path, rank in (("encoder/layer_0/attn/query/kernel", 2),
                       ("encoder/layer_0/attn/out/kernel", 2),
                       ("encoder/layer_0/mlp/wi/kernel", 3)):
        module = path.rpartition("/")[0]
        a, b = flat[f"{module}/lora_a"], flat[f"{module}/lora_b"]
        assert tree.flatten(METHOD.scales(tree.unflatten(flat)))[path] == 4.0 / rank
        merged[path] = flat[path] + sum(
            4.0 / rank * jnp.tensordot(a[..., k * rank:(k + 1) * rank],
                                       b[k * rank:(k + 1) * rank], 1) for k in range(3))
        del merged[f"{module}/lora_a"], merged[f"{module}/lora_b"]
    ours = forward(model, METHOD, tree.unflatten(flat), *batch)
    theirs = forward(model, None, tree.unflatten(merged), *batch)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-5)
    assert np.abs(np.asarray(ours[0]) - np.asarray(base[0])).max() > 1e-2
    # ...and LoRA's merge, given the equivalent LoRA, builds the same tree.
    for path, value in tree.flatten(lora_lib.merge(tree.unflatten(flat), METHOD.lora)).items():
        np.testing.assert_allclose(value, merged[path], atol=1e-5, err_msg=path)


def _one_layer(a, b, w, modules, regulariser="paper"):
    params = {"inner": {"kernel": jnp.asarray(w, jnp.float32), "lora_a": jnp.asarray(a),
                        "lora_b": jnp.asarray(b)}}
    rank = a.shape[-1] // modules
    return params, PEGO(targets=((r"inner/kernel", rank),), modules=modules, alpha=rank,
                        regulariser=regulariser)


def _released_code_regulariser(a, b, w, modules):
    """The authors' loss in their torch layout (weights [out, in], lora_A [r, in],
    lora_B [out, r], scale 1), in float64."""
    w_t, r = w.T.astype(np.float64), a.shape[-1] // modules
    ab = [b[k * r:(k + 1) * r].T.astype(np.float64) @ a[:, k * r:(k + 1) * r].T
          for k in range(modules)]
    loss = 0.0
    for i in range(modules):
        loss += np.abs(w_t @ ab[i].T).sum()
        for j in range(i + 1, modules):
            loss += np.abs(ab[i] @ ab[j].T).sum()
    return loss


def test_regulariser_is_zero_exactly_for_orthogonal_modules():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 4))                            # [in, out], rank 4
    b = rng.normal(size=(6, 4)).astype(np.float32)          # K=3 modules of rank 2
    null = np.linalg.svd(w)[0][:, 4:]                       # unit vectors n with Wᵀn = 0
    orthogonal = null[:, :6].astype(np.float32)             # 6 orthonormal columns
    generic = rng.normal(size=(16, 6)).astype(np.float32)
    for regulariser in ("paper", "gram"):
        params, method = _one_layer(orthogonal, b, w, 3, regulariser)
        assert float(method.orthogonality(params)) < 1e-5, regulariser  # float32 rounding
        params, method = _one_layer(generic, b, w, 3, regulariser)
        assert float(method.orthogonality(params)) > 1.0, regulariser
    # 'paper' is the released code's loss (alpha = r: scale 1, as there).
    params, method = _one_layer(generic, b, w, 3)
    assert float(method.orthogonality(params)) == pytest.approx(
        _released_code_regulariser(generic, b, w, 3), rel=1e-5)
    # Orthogonal to each other but not to W: only the preserve half remains.
    rotated, _ = np.linalg.qr(generic)
    params, method = _one_layer(rotated, b, w, 3)
    assert float(method.orthogonality(params)) == pytest.approx(
        sum(np.abs(w.T @ rotated[:, 2 * k:2 * k + 2] @ b[2 * k:2 * k + 2]).sum()
            for k in range(3)), rel=1e-5)
    _, gram = _one_layer(rotated, b, w, 3, "gram")
    assert float(gram.orthogonality(params)) < 1e-8


def test_optimising_the_regulariser_makes_the_a_blocks_orthonormal():
    """The defining property: the 'gram' regulariser alone drives ``A_catᵀA_cat`` (every
    module's A block against itself and the others) to the identity."""
    w = np.random.default_rng(0).normal(size=(16, 8))
    method = PEGO(targets=((r"inner/kernel", 2),), modules=4, regulariser="gram")
    params = method.init(jax.random.key(0), {"inner": {"kernel": jnp.asarray(w, jnp.float32)}})
    factors = {"lora_a": params["inner"]["lora_a"], "lora_b": params["inner"]["lora_b"]}
    optimizer = optax.adam(1e-2)

    def loss(f):
        return method.orthogonality({"inner": {"kernel": params["inner"]["kernel"], **f}})

    @jax.jit
    def run(f):
        def step(carry, _):
            f, state = carry
            updates, state = optimizer.update(jax.grad(loss)(f), state)
            return (optax.apply_updates(f, updates), state), None
        return jax.lax.scan(step, (f, optimizer.init(f)), None, length=400)[0][0]

    a0 = np.asarray(factors["lora_a"])
    assert np.abs(a0.T @ a0 - np.eye(8)).max() > 0.5       # kaiming init: far from it
    a = np.asarray(run(factors)["lora_a"])
    np.testing.assert_allclose(a.T @ a, np.eye(8), atol=1e-3)


def test_bad_input_is_a_one_line_error(tiny):
    _, params, _ = tiny
    assert isinstance(methods.build(dict(name="pego", targets=METHOD.targets)), PEGO)
    with pytest.raises(ValueError, match="PEGO modules=0 is not a positive integer"):
        PEGO(targets=METHOD.targets, modules=0)
    with pytest.raises(ValueError, match=r"PEGO regulariser='l2' is not one of"):
        PEGO(targets=METHOD.targets, regulariser="l2")
    with pytest.raises(ValueError, match=r"LoRA rank 48 for encoder/layer_0/attn/query/kernel "
                                         r"exceeds its smaller side"):
        PEGO(targets=((r".*/query/kernel", 12),), modules=4).init(jax.random.key(0), params)
    grouped = METHOD.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"rank 6 is not a multiple of modules=4"):
        PEGO(targets=METHOD.targets, modules=4).orthogonality(grouped)


def test_a_step_under_the_loop_logs_the_orthogonality_term():
    setup, state = loop_setup(loop_config(dict(
        name="pego", targets=((r"encoder/.*/kernel", 2),), modules=2, orthogonality_weight=0.1,
        also_train=(r"classifier/.*",))), 10)
    trainable = tree.flatten(state["trainable"])
    assert {p for p in trainable if not p.endswith(("lora_a", "lora_b"))} == {
        "classifier/kernel", "classifier/bias"}
    batch = random_batch(setup)
    step = loop.make_train_step(setup)
    logged = []
    for _ in range(3):
        state, sums = step(state, batch)
        logged.append(float(sums["orthogonality"] / sums["count"]))
    # B starts at zero, so the updates (and the paper's term) start at zero, then grow.
    assert logged[0] == 0.0 and logged[1] > 0 and logged[2] > 0, logged
    expected = 0.1 * float(setup.method.orthogonality(
        tree.combine(jax.device_get(state["trainable"]), jax.device_get(state["frozen"]))))
    state, sums = step(state, batch)
    assert float(sums["orthogonality"] / sums["count"]) == pytest.approx(expected, rel=1e-4)
