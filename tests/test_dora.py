"""DoRA as a tree transform: magnitudes shaped like each kernel's outputs start at ||W|| and
change nothing; the adapted forward equals the merged ``m·(W + s·A·B)/||W + s·A·B||``; the
magnitude scales a layer's output; PEFT's ``use_dora`` adapters match ``peft`` in PyTorch both
ways; under the loop only factors and magnitudes train; bad input is a one-line error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import methods, tree
from research.lowrank import dora as dora_lib
from research.lowrank import peft as peft_lib
from research.lowrank.dora import DoRA
from research.models import hf
from research.models.layers import MultiAxisDense
from research.train import loop, optim
from test_lora import randomize_factors
from tests.tiny_bert import (forward, loop_config, random_params, tiny_model, token_batch,
                             torch_bert_outputs)

TARGETS = ((r"encoder/.*/attn/(query|out)/kernel", 4), (r"encoder/.*/mlp/wi/kernel", 2),
           (r"pooler/kernel", 3))


def randomize_magnitudes(params, seed=2):
    """Magnitudes scaled by random factors in [0.5, 2]."""
    rng = np.random.default_rng(seed)
    return tree.map_with_path(
        lambda p, x: x * jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32)
        if p.endswith(dora_lib.MAGNITUDE) else x, params)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, random_params(model)


@pytest.fixture(scope="module")
def adapted(tiny):
    method = DoRA(targets=TARGETS, alpha=16.0, alpha_rules=((r".*/wi/kernel", 4.0),))
    return method, method.init(jax.random.key(1), tiny[1])


def test_magnitudes_start_at_the_kernel_norms_and_change_nothing(tiny, adapted):
    model, params = tiny
    method, fresh = adapted
    flat, base = tree.flatten(fresh), tree.flatten(params)
    expected = {"encoder/layer_0/attn/query": ((4, 8), (0,)),   # [embed, heads, head_dim]
                "encoder/layer_1/attn/out": ((32,), (0, 1)),    # [heads, head_dim, embed]
                "encoder/layer_0/mlp/wi": ((64,), (0,)),
                "pooler": ((32,), (0,))}
    for module, (shape, inputs) in expected.items():
        magnitude = flat[f"{module}/{dora_lib.MAGNITUDE}"]
        assert magnitude.shape == shape
        np.testing.assert_allclose(magnitude, np.linalg.norm(
            base[f"{module}/kernel"], axis=inputs), rtol=1e-5, err_msg=module)
    assert f"embeddings/word/{dora_lib.MAGNITUDE}" not in flat
    ids, mask, types = token_batch()
    for x, y in zip(forward(model, None, params, ids, mask, types),
                    forward(model, method, fresh, ids, mask, types)):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5)

    logical = tree.flatten(method.logical_axes(loop.abstract_params(model)[1], fresh))
    assert logical["encoder/layer_0/attn/query/dora_m"] == ("heads", "head_dim")
    assert logical["encoder/layer_0/attn/out/dora_m"] == ("embed",)
    mask_tree = tree.flatten(optim.trainable_mask(fresh, (), method.trainable))
    assert {p for p, t in mask_tree.items() if t} == {
        p for p in flat if p.endswith(("lora_a", "lora_b", "dora_m"))}
    assert isinstance(methods.build(dict(name="dora", targets=TARGETS)), DoRA)


def test_adapted_forward_equals_the_merged_weights(tiny, adapted):
    model, params = tiny
    method, fresh = adapted
    moved = randomize_magnitudes(randomize_factors(fresh))
    merged = dora_lib.merge(moved, method)
    tree.check_same_structure(merged, params)
    # The defining formula, on one kernel: m ⊙ V / ||V|| with V = W + s·A·B.
    flat, kernel = tree.flatten(moved), "encoder/layer_1/attn/out/kernel"
    v = flat[kernel] + 16.0 / 4 * np.tensordot(flat["encoder/layer_1/attn/out/lora_a"],
                                               flat["encoder/layer_1/attn/out/lora_b"], 1)
    np.testing.assert_allclose(
        tree.flatten(merged)[kernel],
        flat["encoder/layer_1/attn/out/dora_m"] * v / np.linalg.norm(v, axis=(0, 1)),
        rtol=1e-5, atol=1e-6)
    ids, mask, types = token_batch()
    ours = forward(model, method, moved, ids, mask, types)
    theirs = forward(model, None, merged, ids, mask, types)
    base = forward(model, None, params, ids, mask, types)
    for x, y, b in zip(theirs, ours, base):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5)
        assert np.abs(np.asarray(y) - np.asarray(b)).max() > 1e-2


class _TwoLayers(nn.Module):
    """A Dense, then a multi-axis layer [8, 2, 3] (a query-like kernel)."""
    config: object

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        del deterministic
        hidden = nn.Dense(8, name="dense", bias_init=nn.initializers.normal(1.0))(x)
        return hidden, MultiAxisDense(self.config, ("embed", "heads", "head_dim"), (2, 3),
                                      "...e,ehd->...hd", name="heads")(hidden)


def test_magnitude_scales_the_layer_output():
    module = _TwoLayers(tiny_model().config)
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    params = nn.unbox(module.init(jax.random.key(0), x))["params"]
    method = DoRA(targets=((r".*/kernel", 2),))
    moved = randomize_magnitudes(randomize_factors(method.init(jax.random.key(1), params)))
    hidden, heads = method.apply(module, {"params": moved}, x).outputs
    bias = moved["dense"]["bias"]

    # Doubling the Dense magnitude doubles its output (less the bias); the direction stays.
    doubled = tree.map_with_path(lambda p, v: 2 * v if p == "dense/dora_m" else v, moved)
    hidden2, _ = method.apply(module, {"params": doubled}, x).outputs
    np.testing.assert_allclose(hidden2 - bias, 2 * (hidden - bias), rtol=1e-5, atol=1e-6)
    # Per output feature: scaling m[j] scales feature j alone.
    one = tree.map_with_path(
        lambda p, v: v.at[1, 2].multiply(3.0) if p == "heads/dora_m" else v, moved)
    _, heads3 = method.apply(module, {"params": one}, x).outputs
    ratio = (heads3 - moved["heads"]["bias"]) / (heads - moved["heads"]["bias"])
    expected = np.ones((2, 3))
    expected[1, 2] = 3.0
    np.testing.assert_allclose(ratio, np.broadcast_to(expected, ratio.shape), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# PEFT interop, against peft in PyTorch
# ---------------------------------------------------------------------------------------------


def test_dora_adapters_match_peft_in_torch_both_ways(tiny, adapted, tmp_path):
    import peft
    import torch
    import transformers

    torch.set_num_threads(2)
    model, params = tiny
    method, fresh = adapted
    hf.save_pretrained(model, params, str(tmp_path / "base"))
    ids, mask, types = token_batch(seed=1)

    # Ours -> PEFT: random factors and magnitudes, exported, give the same outputs there.
    moved = randomize_magnitudes(randomize_factors(fresh))
    config = peft_lib.export_peft(method, moved, model, str(tmp_path / "ours"))
    assert config["use_dora"] is True
    torch_model = peft.PeftModel.from_pretrained(
        transformers.BertModel.from_pretrained(str(tmp_path / "base")),
        str(tmp_path / "ours")).eval()
    theirs = torch_bert_outputs(torch_model, ids, mask, types)
    ours = forward(model, method, moved, ids, mask, types)
    for x, y in zip(theirs, ours):
        assert np.abs(np.asarray(y) - x).max() < 1e-4
    again_method, again = peft_lib.import_peft(str(tmp_path / "ours"), model, params)
    assert isinstance(again_method, DoRA)
    for path, value in tree.flatten(moved).items():
        np.testing.assert_allclose(tree.flatten(again)[path], value, atol=1e-7, err_msg=path)

    # PEFT -> ours: an adapter PEFT made (its own magnitude init from W + s·B·A) imports.
    torch.manual_seed(0)
    torch_model = peft.get_peft_model(
        transformers.BertModel.from_pretrained(str(tmp_path / "base")),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                        use_dora=True, init_lora_weights=False)).eval()
    torch_model.save_pretrained(str(tmp_path / "theirs"))
    theirs = torch_bert_outputs(torch_model, ids, mask, types)
    method, imported = peft_lib.import_peft(str(tmp_path / "theirs"), model, params)
    assert isinstance(method, DoRA)
    assert tree.flatten(imported)["encoder/layer_0/attn/value/dora_m"].shape == (4, 8)
    ours = forward(model, method, imported, ids, mask, types)
    for x, y in zip(theirs, ours):
        assert np.abs(np.asarray(y) - x).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# Under the training loop
# ---------------------------------------------------------------------------------------------


def _config(method, hidden=32):
    config = loop_config(method)
    config.model.overrides.update(hidden_size=hidden, mlp_dim=4 * hidden)
    return config


def _batch(setup, rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    return loop.global_batch(setup, {
        "input_ids": rng.integers(1, 1000, (rows, length)).astype(np.int32),
        "attention_mask": np.ones((rows, length), np.int32),
        "token_type_ids": np.zeros((rows, length), np.int32),
        "label": rng.integers(0, 2, (rows,)).astype(np.int32)})


def test_training_under_the_loop_moves_only_factors_and_magnitudes():
    config = _config(dict(name="dora", targets=((r"encoder/.*/kernel", 4),),
                          also_train=(r"classifier/.*",)))
    setup = loop.make_setup(config, loop.build_model(config), 10, devices=jax.devices()[:1])
    state = loop.init_state(config, setup)
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    assert all(p.endswith(("lora_a", "lora_b", "dora_m")) or p.startswith("classifier/")
               for p in trainable)
    assert "encoder/layer_0/mlp/wo/dora_m" in trainable
    assert set(tree.flatten(before["opt_state"][1].mu)) == set(trainable)

    step = loop.make_train_step(setup)
    for index in range(2):
        state, _ = step(state, _batch(setup, seed=index))
    after = jax.device_get(state)
    for path, value in tree.flatten(before["frozen"]).items():
        np.testing.assert_array_equal(tree.flatten(after["frozen"])[path], value, err_msg=path)
    for path, value in trainable.items():
        assert np.abs(tree.flatten(after["trainable"])[path] - value).max() > 0, path


def test_bad_input_is_a_one_line_error(tiny, adapted):
    model, params = tiny
    with pytest.raises(ValueError, match=r"DoRA adapts kernels; embeddings/word/embedding is "
                                         r"an embedding table") as info:
        DoRA(targets=((r"embeddings/word/embedding", 2),)).init(jax.random.key(0), params)
    assert "\n" not in str(info.value)
    method, fresh = adapted
    without = {p: v for p, v in tree.flatten(fresh).items()
               if p != f"pooler/{dora_lib.MAGNITUDE}"}
    with pytest.raises(ValueError, match=r"DoRA layer pooler \(Dense\) has no dora_m"):
        forward(model, method, tree.unflatten(without), *token_batch())
    with pytest.raises(ValueError, match=r"DoRA merge: pooler/kernel has factors but no "
                                         r"pooler/dora_m"):
        dora_lib.merge(tree.unflatten(without), method)
