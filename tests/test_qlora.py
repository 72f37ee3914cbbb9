"""QLoRA: NF4 codes are the nearest of the paper's 16 levels per absmax block and pack two a
byte; int8 rounds to 127 levels; a QLoRA model is LoRA over the dequantised base (and exports
to exactly that plain model); only the factors train; the train step's arguments hold the base
at ≤ 0.3 of float32's bytes (XLA's memory analysis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from research import methods, models, tree
from research.lowrank import qlora
from research.lowrank.lora import LoRA
from research.lowrank.qlora import QLoRA
from research.train import loop

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0, num_classes=3)
TARGETS = ((r"encoder/.*/attn/(query|value)/kernel", 2),)


def test_nf4_codes_are_the_nearest_level_per_block_and_pack_two_a_byte():
    kernel = np.random.default_rng(0).normal(size=(6, 128)).astype(np.float32)
    codes, absmax = qlora.quantize(kernel, "nf4", block_size=64)
    assert codes.dtype == jnp.uint8 and codes.shape == (6, 64) and absmax.shape == (6, 2)
    blocks = kernel.reshape(6, 2, 64)
    np.testing.assert_array_equal(absmax, np.abs(blocks).max(-1))
    nearest = np.abs(blocks[..., None] / np.abs(blocks).max(-1, keepdims=True)[..., None]
                     - qlora.NF4).argmin(-1).reshape(6, 128)
    unpacked = np.stack([np.asarray(codes) & 15, np.asarray(codes) >> 4], -1).reshape(6, 128)
    np.testing.assert_array_equal(unpacked, nearest)  # low nibble first
    np.testing.assert_allclose(qlora.dequantize(codes, absmax, "nf4"),
                               (qlora.NF4[nearest].reshape(6, 2, 64)
                                * np.asarray(absmax)[..., None]).reshape(6, 128), rtol=1e-6)
    # Values on the grid come back exactly; the block's largest entry is ±absmax itself.
    on_grid = (qlora.NF4[np.arange(128) % 16] * 0.5).reshape(1, 128)
    np.testing.assert_array_equal(qlora.dequantize(*qlora.quantize(on_grid, "nf4"), "nf4"),
                                  on_grid)


def test_int8_rounds_to_127_levels_of_the_block_absmax():
    kernel = np.random.default_rng(1).normal(size=(4, 3, 16)).astype(np.float32)
    codes, absmax = qlora.quantize(kernel, "int8", block_size=8)
    assert codes.dtype == jnp.int8 and codes.shape == kernel.shape and absmax.shape == (4, 3, 2)
    scale = np.repeat(np.asarray(absmax), 8, axis=-1)
    np.testing.assert_array_equal(codes, np.round(kernel / scale * 127).astype(np.int8))
    error = np.abs(qlora.dequantize(codes, absmax, "int8") - kernel)
    assert (error <= scale / 254 + 1e-7).all()


def _model():
    return models.build("bert_tiny_classifier", **TINY)


def _inputs():
    ids = np.random.default_rng(2).integers(1, 100, (2, 7)).astype(np.int32)
    return ids, np.ones_like(ids), np.zeros_like(ids)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_qlora_is_lora_over_the_dequantised_base(quant):
    model = _model()
    rng = np.random.default_rng(3)
    base = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype),
                        model.param_shapes())
    method = QLoRA(targets=TARGETS, quant=quant, block_size=16)
    params = method.init(jax.random.key(0), base)
    flat = tree.flatten(params)
    assert "encoder/layer_0/mlp/wi/kernel" not in flat
    assert flat[f"encoder/layer_0/mlp/wi/kernel_{quant}"].dtype == (
        jnp.uint8 if quant == "nf4" else jnp.int8)
    assert "classifier/kernel" in flat  # the head is not in quantize's default
    # Trained factors: the QLoRA model equals a LoRA model whose base is the dequantised one.
    moved = tree.map_with_path(
        lambda p, x: x + 0.3 if p.endswith(("lora_a", "lora_b")) else x, params)
    dequantised = method.export({p: v for p, v in tree.flatten(moved).items()
                                 if not p.endswith(("lora_a", "lora_b"))})
    lora = LoRA(targets=TARGETS)
    factors = {p: v for p, v in tree.flatten(moved).items() if p.endswith(("lora_a", "lora_b"))}
    expected = lora.apply(model.module, {"params": tree.unflatten(
        {**tree.flatten(dequantised), **factors})}, *_inputs()).outputs
    ours = method.apply(model.module, {"params": moved}, *_inputs()).outputs
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    # ...and only quantisation separates it from the float base.
    plain = model.module.apply({"params": base}, *_inputs())
    at_init = method.apply(model.module, {"params": params}, *_inputs()).outputs
    assert 0 < np.abs(at_init - plain).max() < (0.2 if quant == "nf4" else 0.02)


def test_qlora_runs_identically_under_scanned_layers():
    model, scanned = _model(), models.build("bert_tiny_classifier", scan_layers=True, **TINY)
    rng = np.random.default_rng(4)
    base = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype),
                        model.param_shapes())
    method = QLoRA(targets=TARGETS, block_size=16)
    params = tree.map_with_path(lambda p, x: x + 0.1 if p.endswith(("lora_a", "lora_b")) else x,
                                method.init(jax.random.key(0), base))
    np.testing.assert_allclose(
        method.apply(scanned.module, {"params": params}, *_inputs()).outputs,
        method.apply(model.module, {"params": params}, *_inputs()).outputs, atol=1e-5)


def _config(method):
    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = dict(num_classes=2, vocab_size=64, hidden_size=128, num_heads=4,
                                  mlp_dim=512, num_layers=2, max_length=16, hidden_dropout=0.0,
                                  attention_dropout=0.0)
    config.train.batch_size = 4
    config.mesh = dict(data=1)
    config.method = method
    return config


def _argument_bytes(config) -> int:
    model = loop.build_model(config)
    setup = loop.make_setup(config, model, 2, devices=jax.devices()[:1])
    batch = {"input_ids": np.ones((4, 16), np.int32), "attention_mask": np.ones((4, 16), np.int32),
             "token_type_ids": np.zeros((4, 16), np.int32), "label": np.zeros((4,), np.int32)}
    step = loop.make_train_step(setup)
    compiled = step.lower(setup.abstract_state, loop.global_batch(setup, batch)).compile()
    return compiled.memory_analysis().argument_size_in_bytes


def test_the_step_holds_the_quantised_base_at_under_a_third_of_float32():
    """The two steps' arguments differ only in how the stack's kernels are held, so their
    difference against those kernels' float32 bytes gives the quantised base's share."""
    targets = ((r"encoder/.*/attn/(query|value)/kernel", 4),)
    config = _config(dict(name="lora", targets=targets))
    lora = _argument_bytes(config)
    shapes = [x.shape for p, x in tree.flatten(loop.build_model(config).param_shapes()).items()
              if p.startswith("encoder/") and p.endswith("/kernel")]
    kernels = sum(4 * np.prod(shape) for shape in shapes)
    for quant, code_bytes in (("nf4", 0.5), ("int8", 1.0)):
        # Codes, plus one float32 absmax per block of min(64, last axis) entries.
        expected = sum(np.prod(shape) * (code_bytes + 4 / min(64, shape[-1]))
                       for shape in shapes) / kernels
        quantised = _argument_bytes(_config(dict(name="qlora", targets=targets, quant=quant)))
        share = 1 - (lora - quantised) / kernels
        assert share == pytest.approx(expected, rel=1e-6) and share <= 0.3, (quant, share)


def test_bad_quantisation_options_are_one_line_errors():
    for options, message in [
        (dict(quant="fp8"), r"config.method.quant='fp8' is not one of \('nf4', 'int8'\)"),
        (dict(block_size=0), r"config.method.block_size=0 is not a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            methods.build(dict(name="qlora", targets=TARGETS, **options))
        assert "\n" not in str(info.value)
    shapes = _model().param_shapes()
    with pytest.raises(ValueError, match=r"config.method.quantize pattern 'decodr/.*' matches"):
        jax.eval_shape(QLoRA(targets=TARGETS, quantize=("decodr/.*",)).init, jax.random.key(0),
                       shapes)
    with pytest.raises(ValueError, match=r"block_size=3: a kernel's last axis of 8 is not a "):
        qlora.quantize(np.ones((2, 8)), "int8", block_size=3)
