"""The zoo: tiny presets run, masks hold, params are plain and fully named, bf16 compute works."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import models, tree
from research.models.bert import mean_pool

TINY = [name for name in models.NAMES if "_tiny_" in name]
LOGICAL_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "classes",
                 "position", "token_types", None}


@pytest.fixture(scope="module")
def tiny():
    """Each tiny model with its params and a jitted apply. XLA compiles dominate test time:
    'rbg' keys compile faster than threefry ones, and every test below feeds [2, 8] inputs so
    it reuses the compiled apply."""
    built = {}
    for name in TINY:
        model = models.build(name)
        apply = jax.jit(model.module.apply, static_argnames="deterministic")
        built[name] = (model, model.init(jax.random.key(0, impl="rbg")), apply)
    return built


def _inputs(model, seed=0, **changes):
    inputs = model.dummy_inputs(2, 8)
    rng = np.random.default_rng(seed)
    if "image" in inputs:
        inputs["image"] = rng.normal(size=inputs["image"].shape).astype(np.float32)
    else:
        inputs["input_ids"] = rng.integers(1, 100, (2, 8)).astype(np.int32)
    return {**inputs, **changes}


def test_tiny_family_covers_every_architecture():
    assert set(TINY) == {"bert_tiny_encoder", "bert_tiny_classifier", "bert_tiny_mlm",
                         "vit_tiny_classifier", "llama_tiny_lm"}


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_init_and_run(tiny, name):
    model, params, apply = tiny[name]
    inputs = _inputs(model)
    assert set(inputs) == set(model.module.input_names)
    out = apply({"params": params}, **inputs)
    c = model.config
    expected = {"encoding": [(2, 8, c.hidden_size), (2, c.hidden_size)],
                "classification": [(2, c.num_classes)],
                "masked_lm": [(2, 8, c.vocab_size)],
                "causal_lm": [(2, 8, c.vocab_size)]}[model.task]
    leaves = jax.tree.leaves(out)
    assert [leaf.shape for leaf in leaves] == expected
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in leaves)


def test_params_are_plain_float32_arrays(tiny):
    for _, params, _ in tiny.values():
        assert type(params) is dict
        for path, leaf in tree.flatten(params).items():
            assert isinstance(leaf, jax.Array), path
            assert leaf.dtype == jnp.float32, path


@pytest.mark.parametrize("name", TINY)
def test_every_param_has_logical_axes(name):
    model = models.build(name)
    boxed = jax.eval_shape(model.module.init, jax.random.key(0), **model.dummy_inputs(1, 4))
    specs = tree.flatten(nn.get_partition_spec(boxed)["params"])
    shapes = tree.flatten(nn.unbox(boxed)["params"])
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        assert len(spec) == len(shapes[path].shape), path
        assert set(spec) <= LOGICAL_NAMES, (path, spec)
        assert any(axis is not None for axis in spec) or path.endswith("bias"), path
    assert tree.flatten(model.logical_axes()) == specs


def test_llama_is_causal(tiny):
    model, params, apply = tiny["llama_tiny_lm"]
    inputs = _inputs(model)
    changed = inputs["input_ids"].copy()
    changed[:, 5] += 1
    before = apply({"params": params}, **inputs)
    after = apply({"params": params}, **{**inputs, "input_ids": changed})
    np.testing.assert_array_equal(before[:, :5], after[:, :5])
    assert not np.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("name", ["bert_tiny_encoder", "llama_tiny_lm"])
def test_padding_is_invisible(tiny, name):
    model, params, apply = tiny[name]
    mask = np.ones((2, 8), np.int32)
    mask[1, 5:] = 0
    inputs = _inputs(model, attention_mask=mask)
    changed = inputs["input_ids"].copy()
    changed[1, 5:] = 7
    first = jax.tree.leaves(apply({"params": params}, **inputs))[0]
    second = jax.tree.leaves(apply({"params": params}, **{**inputs, "input_ids": changed}))[0]
    np.testing.assert_allclose(first[1, :5], second[1, :5], atol=1e-6)


def test_dropout_depends_on_the_dropout_rng(tiny):
    model, params, apply = tiny["bert_tiny_classifier"]
    inputs = _inputs(model)
    def run(seed):
        return apply({"params": params}, **inputs, deterministic=False,
                     rngs={"dropout": jax.random.key(seed, impl="rbg")})
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))


@pytest.mark.parametrize("name", ["bert_tiny_classifier", "vit_tiny_classifier", "llama_tiny_lm"])
def test_bfloat16_compute_with_float32_params(tiny, name):
    model32, params, apply32 = tiny[name]
    model16 = models.build(name, dtype="bfloat16")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(model16.param_shapes()))
    inputs = _inputs(model32)
    apply16 = jax.jit(model16.module.apply)
    jaxpr = str(jax.make_jaxpr(apply16)({"params": params}, **inputs))
    assert "bf16[2," in jaxpr  # activations really are bfloat16
    low = apply16({"params": params}, **inputs)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, apply32({"params": params}, **inputs), atol=0.1)


def test_mean_pool_ignores_padding():
    x = jnp.arange(12.0).reshape(1, 4, 3)
    pooled = mean_pool(x, jnp.array([[1, 1, 0, 0]]))
    np.testing.assert_allclose(pooled, [[1.5, 2.5, 3.5]])


def test_llama_tied_embeddings_have_no_lm_head():
    model = models.build("llama_tiny_lm", tie_word_embeddings=True)
    assert "lm_head" not in model.param_shapes()


def test_presets_list_and_large_shapes():
    assert {"minilm_l6", "bert_tiny", "bert_base", "vit_tiny", "vit_b16", "llama_tiny",
            "llama_1b"} <= set(models.PRESETS)
    minilm = models.build("minilm_l6_classifier").config
    assert (minilm.num_layers, minilm.hidden_size, minilm.num_heads, minilm.mlp_dim,
            minilm.norm_eps) == (6, 384, 12, 1536, 1e-12)
    shapes = models.build("llama_1b_lm").param_shapes()
    assert 1.0e9 < tree.count(shapes) < 1.6e9


@pytest.mark.parametrize("name, overrides, bad", [
    ("minilm_l7_classifier", {}, "minilm_l7_classifier"),
    ("vit_tiny_mlm", {}, "vit_tiny_mlm"),
    ("bert_tiny_classifier", {"hidden_sise": 64}, "hidden_sise"),
])
def test_unknown_names_are_one_line_errors(name, overrides, bad):
    with pytest.raises(ValueError, match=bad) as error:
        models.build(name, **overrides)
    assert "\n" not in str(error.value)
    assert "valid:" in str(error.value)


@pytest.mark.parametrize("name", ["bert_tiny_encoder", "llama_tiny_lm"])
def test_last_block_on_the_first_rows_only_matches_the_full_stack(tiny, name):
    """A [CLS] classifier runs its last block on one row; that row is exactly what the full
    stack computes there (post-LN BERT with padding, pre-LN causal Llama with rotary)."""
    from research.models.layers import Stack
    model, params, _ = tiny[name]
    stack_params = params["encoder" if "bert" in name else "decoder"]
    stack = Stack(model.config, final_norm="llama" in name)
    x = jax.random.normal(jax.random.key(1), (2, 8, model.config.hidden_size))
    mask = np.ones((2, 8), np.int32)
    mask[1, 5:] = 0
    full = stack.apply({"params": stack_params}, x, mask, True)
    first = stack.apply({"params": stack_params}, x, mask, True, last_rows=2)
    assert first.shape == (2, 2, model.config.hidden_size)
    np.testing.assert_allclose(first, full[:, :2], atol=1e-5)
