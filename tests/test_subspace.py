"""Subspace training: the Fastfood transform's Hadamard matches the explicit matrix; both
projections equal a dense P built entry by entry from their constants, with ~unit columns; the
update is linear in z and lies in the span of P's columns, untargeted leaves untouched; under
the training loop only z moves; bad options are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from research import methods, tree
from research.sparse import subspace
from research.sparse.subspace import Subspace
from research.train import loop

TREE = {"layer": {"kernel": jnp.ones((5, 3)), "bias": jnp.ones((4,))}, "head": jnp.ones((18,))}
TOTAL = 37  # every leaf of TREE


def with_z(params, z):
    return {**params, "subspace": {**params["subspace"], "z": jnp.asarray(z, jnp.float32)}}


def sylvester(n):
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


def dense_projection(own, projection, total, dim):
    """P (total x dim) built entry by entry from the stored constants."""
    if projection == "sparse":
        p = np.zeros((total, dim))
        c = np.sqrt(dim / (total * own["indices"].shape[1]))
        for row, (cols, signs) in enumerate(zip(np.asarray(own["indices"]),
                                                np.asarray(own["signs"]))):
            for col, sign in zip(cols, signs):
                p[row, col] += c * sign
        return p
    width = own["signs"].shape[-1]
    h = sylvester(width)
    blocks = []
    for b, perm, g, s in zip(*(np.asarray(own[n], np.float64) for n in
                               ("signs", "permutation", "gaussian", "scale"))):
        permute = np.eye(width)[perm.astype(int)]  # (Π x)[k] = x[perm[k]]
        blocks.append(s * (h @ np.diag(g) @ permute @ h @ np.diag(b)))  # S: one scale a block
    return np.concatenate(blocks)[:total, :dim]


def test_fwht_matches_the_explicit_hadamard_matrix():
    rng = np.random.default_rng(0)
    for n in (1, 64):
        x = rng.normal(size=(3, n)).astype(np.float32)
        np.testing.assert_allclose(jax.jit(subspace.fwht)(x), x @ sylvester(n).T, atol=1e-4)


@pytest.mark.parametrize("projection", subspace.PROJECTIONS)
def test_projection_equals_an_explicit_dense_matrix(projection):
    dim = 6
    method = Subspace(dim=dim, projection=projection, seed=3)
    params = jax.jit(method.init)(None, TREE)
    assert params["subspace"]["z"].shape == (dim,) and not params["subspace"]["z"].any()
    p = dense_projection(params["subspace"], projection, TOTAL, dim)
    z = np.random.default_rng(1).normal(size=dim)
    update = tree.flatten(jax.jit(method.update)(with_z(params, z)))
    flat = np.concatenate([np.asarray(update[path]).ravel() for path in sorted(update)])
    np.testing.assert_allclose(flat, p @ z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("projection", subspace.PROJECTIONS)
def test_columns_have_about_unit_norm(projection):
    shapes = {"w": jnp.zeros((4096,))}
    method = Subspace(dim=16, projection=projection)
    params = jax.jit(method.init)(None, shapes)
    columns = jax.jit(jax.vmap(lambda z: method.update(with_z(params, z))["w"]))(jnp.eye(16))
    norms = np.linalg.norm(np.asarray(columns), axis=1)
    assert abs(norms.mean() - 1.0) < 0.02 and norms.min() > 0.9 and norms.max() < 1.1


@pytest.mark.parametrize("projection", subspace.PROJECTIONS)
def test_update_is_linear_and_in_the_span_of_p_with_other_leaves_untouched(projection):
    dim = 8
    params0 = {"layer": {"kernel": jnp.arange(15.0).reshape(5, 3), "bias": jnp.ones((4,))},
               "head": jnp.full((18,), 2.0)}
    method = Subspace(dim=dim, projection=projection,
                      targets=((r"layer/bias", False), (r"layer/.*|head", True)))
    params = jax.jit(method.init)(None, params0)
    assert sorted(method.projected(params)) == ["head", "layer/kernel"]
    jax.tree.map(np.testing.assert_array_equal, jax.jit(method.merge)(params), params0)  # θ0

    @jax.jit
    def flat_update(z):
        update = method.update(with_z(params, z))
        return jnp.concatenate([update["head"], update["layer"]["kernel"].ravel()])

    columns = np.asarray(jax.vmap(flat_update)(jnp.eye(dim))).T  # P, one unit z at a time
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=dim), rng.normal(size=dim)
    u1, u2, u12 = (np.asarray(flat_update(z)) for z in (z1, z2, z1 + z2))
    np.testing.assert_allclose(u12, u1 + u2, atol=1e-5)
    coefficients, *_ = np.linalg.lstsq(columns, u1, rcond=None)
    assert np.linalg.norm(columns @ coefficients - u1) < 1e-5 * np.linalg.norm(u1)
    merged = jax.jit(method.merge)(with_z(params, z1))
    np.testing.assert_array_equal(merged["layer"]["bias"], params0["layer"]["bias"])
    assert not np.allclose(merged["head"], params0["head"])


def tiny_config():
    config = common.base_config()
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = dict(num_classes=2, vocab_size=100, hidden_size=16, num_heads=2,
                                  mlp_dim=32, num_layers=1, hidden_dropout=0.0,
                                  attention_dropout=0.0, max_length=16)
    config.method = dict(name="subspace", dim=32, projection="fastfood")
    config.optim.learning_rate = 1e-1
    config.optim.schedule = "constant"
    config.mesh = dict(data=1)
    return config


def test_training_under_the_loop_moves_only_z():
    config = tiny_config()
    setup = loop.make_setup(config, loop.build_model(config), 10, devices=jax.devices()[:1])
    assert list(tree.flatten(setup.abstract_state["trainable"])) == ["subspace/z"]
    # loop.init_state, with random model weights drawn in numpy (flax's init costs a compile)
    rng = np.random.default_rng(0)
    model_params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype),
                                setup.model.param_shapes())
    trainable, frozen = tree.split(jax.jit(setup.method.init)(None, model_params),
                                   setup.trainable)
    state = jax.device_put({"step": jnp.zeros((), jnp.int32), "trainable": trainable,
                            "rng": jax.random.key_data(jax.random.key(0)), "frozen": frozen,
                            "opt_state": setup.tx.init(trainable)}, setup.state_shardings)
    frozen = jax.device_get(frozen)
    batch = loop.global_batch(setup, {
        "input_ids": rng.integers(1, 100, (4, 12)).astype(np.int32),
        "attention_mask": np.ones((4, 12), np.int32),
        "token_type_ids": np.zeros((4, 12), np.int32),
        "label": rng.integers(0, 2, (4,)).astype(np.int32)})
    step = loop.make_train_step(setup)
    for _ in range(2):
        state, sums = step(state, batch)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["frozen"]), frozen)
    assert np.abs(np.asarray(state["trainable"]["subspace"]["z"])).max() > 0
    moments = jax.tree.leaves(state["opt_state"])
    assert sum(x.size for x in moments) <= 2 * 32 + 2  # Adam's moments of z, and a counter


@pytest.mark.parametrize("options, message", [
    (dict(dim=0), "dim=0 (config.method.dim) is not a positive integer"),
    (dict(dim=-3), "dim=-3"),
    (dict(projection="dense"), "projection='dense'"),
    (dict(dim=38), "dim=38 (config.method.dim) exceeds the 37 projected parameters"),
    (dict(targets=((r"layer/kernle", True),)), "matches no parameter; closest: layer/kernel"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError) as err:
        methods.build(dict(name="subspace", **options)).init(None, TREE)
    assert message in str(err.value) and "\n" not in str(err.value)
