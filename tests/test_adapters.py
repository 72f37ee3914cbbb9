"""Many LoRA adapters: a saved adapter loads back bit for bit and fits only its own base; two
adapters active at once equal merging both; a mixed batch equals running each row through its
own adapter; one compilation serves every mix of the same shapes; zero-padded ranks are exact."""

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from research import methods, models, tree
from research.lowrank import adapters as lib
from research.lowrank.lora import LoRA, factor_pairs, merge
from tests.tiny_bert import forward

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0)
# Different targets and ranks, so the stack pads ranks and holds zeros where one adapter
# leaves a module alone.
ONE = LoRA(targets=((r"encoder/.*/attn/(query|out)/kernel", 2), (r"embeddings/word/embedding", 2)),
           alpha=4.0)
TWO = LoRA(targets=((r"encoder/.*/attn/query/kernel", 4), (r"encoder/.*/mlp/wi/kernel", 4)),
           alpha=8.0, alpha_rules=((r".*/wi/kernel", 2.0),), rslora=True)
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def tiny_model(**overrides):
    return models.build("bert_tiny_encoder", **{**TINY, **overrides})


def random_params(model, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32),
                        model.param_shapes())


def random_adapter(method, params, seed):
    """``method``'s factors for ``params``, all random (a trained adapter, not a fresh one)."""
    rng = np.random.default_rng(seed)
    _, shapes = lib.detach(jax.eval_shape(method.init, jax.random.key(0), params))
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), jnp.float32),
                        shapes)


def token_batch(rows=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), np.int32)
    mask[1, 8:] = 0
    return ids, mask, np.zeros_like(ids)


serve = jax.jit(lib.mixed_apply, static_argnums=0)


@contextlib.contextmanager
def backend_compiles():
    """Counts XLA compilations (every jit cache miss ends in one)."""
    events = []
    def listen(event, duration, **_):
        del duration
        if event == BACKEND_COMPILE:
            events.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    params = random_params(model)
    return model, params, random_adapter(ONE, params, 1), random_adapter(TWO, params, 2)


def test_save_load_round_trip_is_bit_exact(tiny, tmp_path, monkeypatch):
    _, params, _, adapter = tiny
    adapted = lib.attach(params, adapter)
    lib.save_adapter(str(tmp_path / "two"), TWO, adapted)
    assert sorted(os.listdir(tmp_path)) == ["two"]  # no staging folder left behind
    assert sorted(os.listdir(tmp_path / "two")) == [lib.CONFIG, lib.WEIGHTS]
    method, loaded = lib.load_adapter(str(tmp_path / "two"))
    assert method == TWO
    assert set(tree.flatten(loaded)) == set(tree.flatten(adapter))
    for path, value in tree.flatten(adapter).items():
        got = tree.flatten(loaded)[path]
        assert got.dtype == value.dtype and np.array_equal(got, value), path
    again = tree.flatten(lib.attach(params, loaded))
    assert all(np.array_equal(again[p], v) for p, v in tree.flatten(adapted).items())
    assert tree.flatten(method.scales(lib.attach(params, loaded))) == tree.flatten(
        TWO.scales(adapted))

    def fail(tensors, path, **_):
        with open(path, "wb") as file:
            file.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        lib.save_adapter(str(tmp_path / "broken"), TWO, adapted)
    assert sorted(os.listdir(tmp_path)) == ["two"]


def test_attaching_to_another_base_is_a_one_line_error(tiny):
    _, params, _, adapter = tiny
    wider = tiny_model(hidden_size=48)
    with pytest.raises(ValueError, match=r"^adapter for encoder/layer_0/attn/query: lora_a "
                                         r"\(32, 4\) and lora_b \(4, 4, 8\) make \(32, 4, 8\); "
                                         r"the base's encoder/layer_0/attn/query/kernel is "
                                         r"\(48, 4, 12\)$"):
        lib.attach(wider.param_shapes(), adapter)
    misnamed = {p.replace("attn/query", "attn/qeury"): v for p, v in tree.flatten(adapter).items()}
    with pytest.raises(ValueError, match=r"adapter module 'encoder/layer_0/attn/qeury' has no "
                                         r"kernel or embedding in the base; closest: "
                                         r"encoder/layer_0/attn/query") as info:
        lib.attach(params, tree.unflatten(misnamed))
    assert "\n" not in str(info.value)


def test_two_adapters_at_once_equal_merging_both(tiny):
    model, params, one, two = tiny
    both = lib.MultiLoRA(adapters=(("one", ONE), ("two", TWO)), weights=(1.0, 0.5))
    named = lib.attach(lib.attach(params, one, "one"), two, "two")
    # Plain LoRA does not misread named factors; the default trainable set is exactly them.
    assert factor_pairs(tree.flatten(named)) == {}
    flat = tree.flatten(named)
    assert flat["encoder/layer_0/attn/query/lora/two/a"].shape == (32, 4)
    trains = tree.flatten(tree.mask_from_patterns(both.trainable, named))
    assert {p for p, t in trains.items() if t} == set(flat) - set(tree.flatten(params))
    logical = tree.flatten(both.logical_axes(model.logical_axes(), named))
    assert logical["encoder/layer_0/attn/query/lora/two/b"] == (None, "heads", "head_dim")
    assert logical["encoder/layer_1/attn/out/lora/one/a"] == ("heads", "head_dim", None)

    scales = both.scales(named)
    assert tree.flatten(scales["two"]) == pytest.approx(
        {p: 0.5 * s for p, s in tree.flatten(TWO.scales(lib.attach(params, two))).items()})
    merged = merge(lib.attach(params, one), scales["one"])
    merged = merge(lib.attach(merged, two), scales["two"])
    ids, mask, types = token_batch()
    ours = forward(model, both, named, ids, mask, types)
    theirs = forward(model, None, merged, ids, mask, types)
    for x, y in zip(ours, theirs):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() < 1e-5
    alone = forward(model, None, merge(lib.attach(params, one), ONE), ids, mask, types)
    assert np.abs(np.asarray(ours[0]) - np.asarray(alone[0])).max() > 1e-2

    # As a registered method from a config: fresh factors under each name, B = 0.
    built = methods.build(dict(name="multi_lora", adapters=("x", ("y", dict(alpha=2.0))),
                               lora=dict(targets=((r".*/wi/kernel", 2),))))
    shapes = tree.flatten(jax.eval_shape(built.init, jax.random.key(0), params))
    assert shapes["encoder/layer_1/mlp/wi/lora/y/b"].shape == (2, 64)
    assert dict(built.adapters)["y"].alpha == 2.0
    with pytest.raises(ValueError, match=r"adapter 'three' has no factors in params; params "
                                         r"hold adapters \['one', 'two'\]"):
        lib.MultiLoRA(adapters=("one", "three"), lora=dict(targets=ONE.targets)).scales(named)


def _per_row_reference(tiny, adapter_ids, ids, mask, types):
    """Each row through its own adapter alone, or the base for -1. The adapter is merged into
    the base (equal to LoRA's forward, test_lora checks), so one compiled graph serves all."""
    model, params, one, two = tiny
    outputs = [forward(model, None, merge(lib.attach(params, adapter), method), ids, mask, types)
               for method, adapter in ((ONE, one), (TWO, two))]
    base = forward(model, None, params, ids, mask, types)
    return [np.stack([np.asarray((outputs[i] if i >= 0 else base)[k][row])
                      for row, i in enumerate(adapter_ids)]) for k in range(2)]


def test_mixed_batch_equals_each_row_through_its_own_adapter(tiny):
    model, params, one, two = tiny
    stacked = lib.stack_adapters(params, [(ONE, one), (TWO, two)])
    flat = tree.flatten(stacked)
    # Ranks 2 and 4 share the rank axis: adapter one is zero-padded, zero where absent.
    assert flat["encoder/layer_0/attn/query/a"].shape == (2, 32, 4)
    assert not np.any(flat["encoder/layer_0/attn/query/a"][0, :, 2:])
    assert not np.any(flat["encoder/layer_0/mlp/wi/a"][0]) and flat[
        "encoder/layer_0/mlp/wi/scale"][0] == 0
    assert flat["embeddings/word/scale"].tolist() == [2.0, 0.0]

    ids, mask, types = token_batch()
    adapter_ids = np.array([0, 1, 0, -1], np.int32)
    ours = serve(model.module, params, stacked, adapter_ids, ids, mask, types)
    for x, y in zip(ours, _per_row_reference(tiny, adapter_ids, ids, mask, types)):
        assert np.abs(np.asarray(x) - y).max() < 1e-5


def test_one_compilation_serves_every_mix_of_the_same_shapes(tiny):
    model, params, one, two = tiny
    ids, mask, types = token_batch()
    stacked = lib.stack_adapters(params, [(ONE, one), (TWO, two)])
    serve(model.module, params, stacked, np.array([0, 1, 0, -1], np.int32), ids, mask, types)
    # Other ids, the adapters swapped, other factor values, other weights: no new compile.
    other = lib.stack_adapters(params, [(TWO, random_adapter(TWO, params, 7)), (ONE, one)],
                               weights=(0.3, 2.0))
    mixes = [(stacked, [1, 1, 0, 0]), (stacked, [-1, -1, -1, 1]), (other, [0, 1, 1, 0])]
    with backend_compiles() as compiles:
        outputs = [serve(model.module, params, s, np.array(i, np.int32), ids, mask, types)
                   for s, i in mixes]
    assert compiles == [] and serve._cache_size() == 1
    assert np.abs(np.asarray(outputs[0][0]) - np.asarray(outputs[1][0])).max() > 1e-2
    swapped = _per_row_reference(tiny, [1, 0, 0, 1], ids, mask, types)
    assert np.abs(np.asarray(outputs[2][0]) - swapped[0]).max() > 1e-2  # new contents used

    # A wider rank is a new shape (the counter sees it); zero padding gives the same numbers.
    padded = lib.stack_adapters(params, [(ONE, one), (TWO, two)], rank=8)
    with backend_compiles() as compiles:
        wide = serve(model.module, params, padded, np.array([1, 1, 0, 0], np.int32),
                     ids, mask, types)
    assert len(compiles) == 1 and serve._cache_size() == 2
    np.testing.assert_array_equal(wide[0], outputs[0][0])
    a, b = (tree.flatten(padded)[f"encoder/layer_0/attn/query/{leaf}"][0] for leaf in "ab")
    one_flat = tree.flatten(one)
    assert np.array_equal(jnp.tensordot(a, b, 1), jnp.tensordot(
        one_flat["encoder/layer_0/attn/query/lora_a"],
        one_flat["encoder/layer_0/attn/query/lora_b"], 1))


def test_bad_input_is_a_one_line_error(tiny):
    model, params, one, two = tiny
    with pytest.raises(ValueError, match=r"rank=3 is below the largest adapter rank 4"):
        lib.stack_adapters(params, [(ONE, one), (TWO, two)], rank=3)
    stacked = lib.stack_adapters(params, [(ONE, one)])
    ids, mask, types = token_batch()
    with pytest.raises(ValueError, match=r"embeddings/word gets inputs \(4, 12\) whose leading "
                                         r"axis is not the batch of 3 adapter_ids"):
        lib.mixed_apply(model.module, params, stacked, np.zeros(3, np.int32), ids, mask, types)
    with pytest.raises(ValueError, match=r"MultiLoRA weights=\[1.0\] needs one weight per "
                                         r"adapter \['a', 'b'\]"):
        lib.MultiLoRA(adapters=("a", "b"), lora=dict(targets=ONE.targets), weights=(1.0,))
    with pytest.raises(ValueError, match=r"MultiLoRA adapter 'a': LoRA needs targets"):
        lib.MultiLoRA(adapters=("a",))
    with pytest.raises(ValueError, match=r"adapter name 'a/b' is not a plain path component"):
        lib.attach(params, one, "a/b")
