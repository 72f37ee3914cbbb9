"""The hashed dropout mask: each element is kept with probability 1 - rate, independently of its
neighbours and of other keys' masks; kept values are scaled by 1 / (1 - rate); the mask is the
same whatever the sharding; the models' dropout draws through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.models import dropout as dropout_lib
from research.models.dropout import Dropout, dropout, keep_mask
from tests.tiny_bert import one_line, tiny_model, random_params, token_batch

SHAPE = (8, 4, 64, 64)  # 131,072 elements: a binomial's 5 sigma at p = 0.1 is 0.0041


def test_positions_are_the_row_major_index():
    np.testing.assert_array_equal(dropout_lib._positions(SHAPE),
                                  np.arange(np.prod(SHAPE), dtype=np.uint32).reshape(SHAPE))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_each_element_is_kept_with_probability_one_minus_rate(rate):
    keep = np.asarray(keep_mask(jax.random.key(0), rate, SHAPE))
    assert abs(keep.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / keep.size)
    # Independence: neighbours along each axis, and the same position under another key, are
    # both kept with probability (1 - rate)^2 (a shifted or unmixed stream is not).
    other = np.asarray(keep_mask(jax.random.key(1), rate, SHAPE))
    pairs = {"last axis": (keep[..., 1:], keep[..., :-1]), "rows": (keep[:, :, 1:], keep[:, :, :-1]),
             "first axis": (keep[1:], keep[:-1]), "another key": (keep, other)}
    for name, (a, b) in pairs.items():
        both = (a & b).mean()
        bound = 5 * np.sqrt((1 - rate) ** 2 * (1 - (1 - rate) ** 2) / a.size)
        assert abs(both - (1 - rate) ** 2) < bound, (name, both)


def test_the_mask_is_a_function_of_the_key_under_any_prng():
    key = jax.random.key(3)
    np.testing.assert_array_equal(keep_mask(key, 0.3, SHAPE), keep_mask(key, 0.3, SHAPE))
    for impl in ("threefry2x32", "unsafe_rbg"):
        mask = keep_mask(jax.random.key(3, impl=impl), 0.3, SHAPE)
        assert abs(float(mask.mean()) - 0.7) < 0.01


def test_dropout_zeroes_or_scales_each_element():
    x = jax.random.normal(jax.random.key(0), SHAPE)
    rate, key = 0.25, jax.random.key(5)
    keep = np.asarray(keep_mask(key, rate, SHAPE))
    out = np.asarray(dropout(key, rate, x))
    np.testing.assert_allclose(out[keep], np.asarray(x)[keep] / 0.75, rtol=1e-6)
    assert (out[~keep] == 0).all()
    grad = jax.grad(lambda v: dropout(key, rate, v).sum())(x)
    np.testing.assert_allclose(grad, keep / 0.75, rtol=1e-6)
    assert dropout(key, 0.0, x) is x
    assert not np.asarray(dropout(key, 1.0, x)).any()


def test_the_mask_is_the_same_under_any_sharding():
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("a", "b"))
    key = jax.random.key(7)
    whole = jax.jit(lambda k: keep_mask(k, 0.2, SHAPE))(key)
    for spec in (PartitionSpec("a", "b"), PartitionSpec(None, None, "b", "a")):
        sharded = jax.jit(lambda k: keep_mask(k, 0.2, SHAPE),
                          out_shardings=NamedSharding(mesh, spec))(key)
        np.testing.assert_array_equal(sharded, whole, err_msg=str(spec))


def test_module_follows_flax_dropout_interface():
    module = Dropout(0.5)
    x = jnp.ones((4, 16))
    assert module.apply({}, x, deterministic=True) is x
    one = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    two = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert set(np.unique(one)) == {0.0, 2.0} and not np.array_equal(one, two)
    with pytest.raises(ValueError, match=r"dropout rate 1.5 is not in \[0, 1\)") as info:
        keep_mask(jax.random.key(0), 1.5, (2,))
    one_line(info)


def test_a_training_forward_drops_and_the_rng_decides():
    model = tiny_model("classifier", hidden_dropout=0.3, attention_dropout=0.3)
    params = random_params(model)
    ids, mask, types = token_batch()

    def run(seed, deterministic=False):
        return np.asarray(jax.jit(model.module.apply, static_argnames="deterministic")(
            {"params": params}, ids, mask, types, deterministic=deterministic,
            rngs={"dropout": jax.random.key(seed)}))

    assert not np.allclose(run(0), run(0, deterministic=True))
    assert not np.allclose(run(0), run(1))
    np.testing.assert_array_equal(run(0), run(0))
