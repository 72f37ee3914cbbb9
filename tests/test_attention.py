"""Fused attention (jax.nn.dot_product_attention) equals the einsum reference: masks, GQA,
first rows only, bf16, whole models and their gradients, the dropout fallback; both equal a
hand-written numpy reference, which pins the causal diagonal and the GQA grouping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import models
from research.models.attention import (Mask, attend, effective_impl, einsum_attention,
                                       fused_attention, make_mask)


def _qkv(seed=0, batch=2, rows=6, length=6, heads=4, kv_heads=4, head_dim=8,
         dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = [(batch, rows, heads, head_dim)] + [(batch, length, kv_heads, head_dim)] * 2
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


def _padding(kind, batch=2, length=6):
    """Example 1 padded on the right (its last two keys) or on the left (its first two: with
    a causal mask its first two query rows then have nothing to attend to)."""
    if kind is None:
        return None
    padding = np.ones((batch, length), bool)
    padding[1, slice(0, 2) if kind == "left" else slice(-2, None)] = False
    return jnp.asarray(padding)


CASES = {  # name: (shape settings, padding, causal)
    "no_mask": ({}, None, False),
    "padding": ({}, "right", False),
    "causal": ({}, None, True),
    "causal_padding": ({}, "left", True),
    "gqa": ({"kv_heads": 2}, "left", True),
    "mqa": ({"kv_heads": 1}, "right", False),
    "rows_1": ({"rows": 1, "kv_heads": 2}, "right", False),
    "rows_3_causal": ({"rows": 3}, "left", True),
}


@pytest.mark.parametrize("name", CASES)
def test_fused_equals_einsum(name):
    shape, padding, causal = CASES[name]
    query, key, value = _qkv(**shape)
    mask = Mask(_padding(padding), causal)
    expected = einsum_attention(query, key, value, mask)
    got = fused_attention(query, key, value, mask)
    assert got.shape == expected.shape == query.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_bfloat16_fused_is_close_to_einsum():
    query, key, value = _qkv(kv_heads=2, dtype=jnp.bfloat16)
    mask = Mask(_padding("left"), causal=True)
    expected = einsum_attention(query, key, value, mask)
    got = fused_attention(query, key, value, mask)
    assert got.dtype == expected.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), expected.astype(jnp.float32),
                               atol=2e-2, rtol=0)


def _numpy_attention(query, key, value, padding, causal):
    """Loops, no broadcasting: query head h reads key/value head h // (heads // kv_heads);
    row i sees keys j <= i that are not padding; a row that sees nothing averages all keys
    (HF's finite float32-min bias gives exactly that)."""
    query, key, value = (np.asarray(a, np.float64) for a in (query, key, value))
    batch, rows, heads, head_dim = query.shape
    length, kv_heads = key.shape[1], key.shape[2]
    out = np.zeros_like(query)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            for i in range(rows):
                seen = np.array([padding[b, j] and (not causal or j <= i)
                                 for j in range(length)])
                scores = key[b, :, kv] @ query[b, i, h] / np.sqrt(head_dim)
                weights = np.where(seen, np.exp(scores - scores[seen].max()), 0.0) \
                    if seen.any() else np.ones(length)
                out[b, i, h] = weights / weights.sum() @ value[b, :, kv]
    return out


@pytest.mark.parametrize("impl", ["einsum", "fused"])
def test_both_paths_match_a_numpy_reference(impl):
    query, key, value = _qkv(seed=1, kv_heads=2)
    padding = _padding("left")
    got = attend(query, key, value, Mask(padding, causal=True), impl)
    expected = _numpy_attention(query, key, value, np.asarray(padding), causal=True)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["einsum", "fused"])
def test_a_fully_masked_row_stays_finite(impl):
    query, key, value = _qkv(seed=2, kv_heads=2)
    padding = jnp.asarray(np.array([[True] * 6, [False] * 6]))

    def run(query):
        return attend(query, key, value, Mask(padding, causal=True), impl)

    out = run(query)
    # Nothing allowed: float32-min everywhere is a uniform softmax, so the mean value.
    mean = jnp.repeat(value[1].mean(0), 2, axis=0)
    np.testing.assert_allclose(out[1], jnp.broadcast_to(mean, out[1].shape), atol=1e-5)
    grad = jax.grad(lambda q: run(q).sum())(query)
    assert bool(jnp.isfinite(out).all()) and bool(jnp.isfinite(grad).all())


def test_a_mask_works_closed_over_in_scan_and_through_checkpoint():
    """The lead's scanned stack closes over the mask; remat passes it as an argument, where
    ``causal`` must stay a Python bool (static pytree metadata), not a tracer."""
    query, key, value = _qkv(seed=3, kv_heads=2)
    expected = fused_attention(query, key, value, Mask(_padding("left"), True))

    @jax.jit
    def scanned(padding):
        mask = make_mask(padding, causal=True)
        def body(carry, _):
            return carry, fused_attention(query, key, value, mask)
        return jax.lax.scan(body, 0, None, length=2)[1]

    checkpointed = jax.checkpoint(lambda mask: einsum_attention(query, key, value, mask))
    np.testing.assert_allclose(scanned(_padding("left"))[1], expected, atol=1e-5)
    np.testing.assert_allclose(checkpointed(Mask(_padding("left"), True)), expected,
                               atol=1e-5)
    assert jax.tree.leaves(Mask(None, True)) == []


def test_dropout_falls_back_to_einsum_and_bad_inputs_are_one_line_errors():
    assert effective_impl("fused", 0.0) == "fused"
    assert effective_impl("fused", 0.1) == "einsum"
    with pytest.raises(ValueError, match="not one of"):
        effective_impl("flash", 0.0)
    with pytest.raises(ValueError, match=r"not \[batch, key\]"):
        make_mask(jnp.ones((2, 1, 6)), causal=False)
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        einsum_attention(*_qkv(), dropout_rate=0.1)


def _token_inputs(model, seed=0):
    inputs = model.dummy_inputs(2, 8)
    inputs["input_ids"] = np.random.default_rng(seed).integers(1, 100, (2, 8)).astype(np.int32)
    inputs["attention_mask"] = np.ones((2, 8), np.int32)
    inputs["attention_mask"][1, :3] = 0  # left padding: causal rows 0..2 see nothing
    return inputs


def _pair(name, **overrides):
    einsum = models.build(name, **overrides)
    fused = models.build(name, attention_impl="fused", **overrides)
    return einsum, fused, einsum.init(jax.random.key(0, impl="rbg"))


def test_llama_fused_logits_and_gradients_equal_einsum():
    einsum, fused, params = _pair("llama_tiny_lm")
    inputs = _token_inputs(einsum)

    # Padded positions are out of the loss, as in every task: a row that sees nothing passes
    # its cotangent to q and k through the einsum path's additive bias, not the fused one's.
    weight = inputs["attention_mask"][..., None]

    def loss_and_grad(model):
        def loss(params):
            logits = model.module.apply({"params": params}, **inputs)
            return (weight * logits * jnp.sin(jnp.arange(logits.shape[-1]))).mean(), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, logits_e), grads_e = loss_and_grad(einsum)
    (_, logits_f), grads_f = loss_and_grad(fused)
    np.testing.assert_allclose(logits_f, logits_e, atol=1e-5, rtol=0)
    jax.tree.map(lambda f, e: np.testing.assert_allclose(f, e, atol=1e-6, rtol=1e-4),
                 grads_f, grads_e)


def test_bert_classifier_fused_equals_einsum_on_its_first_row_only_block():
    einsum, fused, params = _pair("bert_tiny_classifier")
    inputs = _token_inputs(einsum)
    logits_e = jax.jit(einsum.module.apply)({"params": params}, **inputs)
    logits_f = jax.jit(fused.module.apply)({"params": params}, **inputs)
    np.testing.assert_allclose(logits_f, logits_e, atol=1e-5, rtol=0)


def test_fused_with_attention_dropout_equals_einsum_given_the_same_rng():
    einsum, fused, params = _pair("bert_tiny_classifier", attention_dropout=0.2)
    inputs = _token_inputs(einsum)

    def run(model, seed, deterministic=False):
        return jax.jit(model.module.apply, static_argnames="deterministic")(
            {"params": params}, **inputs, deterministic=deterministic,
            rngs={"dropout": jax.random.key(seed, impl="rbg")})

    np.testing.assert_array_equal(run(fused, 0), run(einsum, 0))
    assert not np.allclose(run(fused, 0), run(fused, 0, deterministic=True))
    assert not np.allclose(run(fused, 0), run(fused, 1))
