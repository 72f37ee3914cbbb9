"""Masks and sparse deltas: rule masks with slices, exact global top-K, apply/compose/densify,
safetensors files whose size follows density, and the ``sparse`` method under the loop leaving
every entry outside its mask bit-identical with no optimizer state for frozen leaves; bad
input is a one-line error naming the path."""

import os

import jax
import numpy as np
import pytest

from research import tree
from research.sparse import delta as delta_lib
from research.sparse import masks
from research.sparse.sparse_ft import SparseFT
from research.train import loop
from tests.test_lora import _batch, _setup


def params_like(seed=0):
    rng = np.random.default_rng(seed)
    return {"block": {"attn": {"out": {"kernel": rng.normal(size=(4, 3, 8)).astype(np.float32)}},
                      "mlp": {"kernel": rng.normal(size=(8, 16)).astype(np.float32),
                              "bias": rng.normal(size=(16,)).astype(np.float32)}},
            "head": {"kernel": rng.normal(size=(8, 2)).astype(np.float32)}}


def test_rule_masks_select_whole_leaves_and_slices():
    params = params_like()
    mask = masks.from_rules([(r".*/attn/out/kernel", masks.Slices(0, [1, 3])),
                             (r".*/bias", True)], params)
    heads = mask["block"]["attn"]["out"]["kernel"]
    assert heads[[1, 3]].all() and not heads[[0, 2]].any()
    assert mask["block"]["mlp"]["bias"] is True and mask["head"]["kernel"] is False
    assert masks.count(mask, params) == 2 * 3 * 8 + 16
    assert masks.density(mask, params) == pytest.approx((48 + 16) / (96 + 128 + 16 + 16))


def test_top_k_is_exact_and_global_with_ties():
    scores = {"a": np.array([3.0, -5.0, 1.0, 1.0]), "b": np.array([1.0, 4.0, 0.5])}
    mask = masks.top_k(scores, k=4)
    assert mask["a"].tolist() == [True, True, True, False]  # the tie at 1.0: first ones first
    assert mask["b"].tolist() == [False, True, False]
    assert masks.count(mask, scores) == 4
    only_b = masks.top_k(scores, density=0.7, rules=[("b", True)])
    assert only_b["a"] is False and only_b["b"].tolist() == [True, True, False]


def test_difference_apply_round_trips_and_leaves_the_rest_bit_identical():
    base, finetuned = params_like(0), params_like(1)
    mask = masks.top_k(tree.sub(finetuned, base), density=0.1)
    delta = delta_lib.difference(finetuned, base, mask)
    applied = tree.flatten(delta_lib.apply(base, delta))
    chosen = tree.flatten(masks.from_rules([], base))  # all False, to be filled per leaf
    for path, leaf in tree.flatten(base).items():
        selected = np.asarray(tree.flatten(mask)[path])
        new = np.asarray(applied[path])
        np.testing.assert_array_equal(new[~selected], leaf[~selected], err_msg=path)
        np.testing.assert_allclose(new[selected], tree.flatten(finetuned)[path][selected],
                                   rtol=1e-6, err_msg=path)
        chosen[path] = selected
    dense = tree.flatten(delta_lib.densify(delta))
    assert sum(np.count_nonzero(v) for v in dense.values()) == delta.count
    assert tree.flatten(delta_lib.as_mask(delta)).keys() == chosen.keys()


def test_composition_is_order_independent_and_equals_the_sum():
    base = params_like(0)
    a = delta_lib.difference(params_like(1), base, masks.top_k(params_like(1), density=0.2))
    b = delta_lib.difference(params_like(2), base, masks.top_k(params_like(2), density=0.2))
    ab, ba = delta_lib.compose(a, b), delta_lib.compose(b, a)
    for path in ab.indices:
        np.testing.assert_array_equal(ab.indices[path], ba.indices[path])
        np.testing.assert_array_equal(ab.values[path], ba.values[path])
    summed = tree.add(delta_lib.densify(a), delta_lib.densify(b))
    for path, value in tree.flatten(delta_lib.densify(ab)).items():
        np.testing.assert_array_equal(value, tree.flatten(summed)[path])
    assert ab.count <= a.count + b.count


def test_files_are_atomic_and_their_size_follows_density(tmp_path):
    base = {"w": np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)}
    sizes = {}
    for density in (0.05, 0.5):
        delta = delta_lib.difference(tree.scale(base, 2.0), base,
                                     masks.top_k(base, density=density))
        path = str(tmp_path / f"d{density}.safetensors")
        delta_lib.save(delta, path)
        loaded = delta_lib.load(path)
        np.testing.assert_array_equal(loaded.indices["w"], delta.indices["w"])
        np.testing.assert_array_equal(loaded.values["w"], delta.values["w"])
        assert loaded.shapes == delta.shapes
        sizes[density] = os.path.getsize(path)
    assert not list(tmp_path.glob("*.partial"))
    dense_bytes = base["w"].nbytes
    assert sizes[0.05] / dense_bytes == pytest.approx(0.1, abs=0.01)  # int32 + float32 each
    assert sizes[0.5] / sizes[0.05] == pytest.approx(10, rel=0.05)


def test_bad_input_names_the_path():
    base = params_like()
    with pytest.raises(ValueError, match="outside") as info:
        masks.top_k(base, density=1.5)
    assert "\n" not in str(info.value)
    wrong = masks.from_rules([], base)
    wrong["block"]["mlp"]["bias"] = np.ones(3, bool)
    with pytest.raises(ValueError, match="block/mlp/bias"):
        masks.check(wrong, base)
    other = {**base, "head": {"kernel": np.zeros((8, 3), np.float32)}}
    a = delta_lib.difference(base, base, masks.top_k(base, k=3))
    b = delta_lib.difference(other, other, masks.top_k(other, k=3))
    with pytest.raises(ValueError, match="head/kernel") as info:
        delta_lib.compose(a, b)
    assert "\n" not in str(info.value)
    renamed = {"blocks": base["block"], "head": base["head"]}
    with pytest.raises(ValueError, match="block/"):
        delta_lib.apply(renamed, a)
    with pytest.raises(ValueError, match="axis 5"):
        masks.from_rules([("head/kernel", masks.Slices(5, [0]))], base)


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    """A mask over a tiny classifier: 5% of the encoder's entries, one head's out rows."""
    _, setup = _setup(dict(name="full"))
    shapes = setup.model.param_shapes()
    scores = jax.tree.map(lambda s: np.random.default_rng(0).normal(size=s.shape), shapes)
    mask = masks.top_k(scores, density=0.05, rules=[(r"encoder/.*", True)])
    path = str(tmp_path_factory.mktemp("mask") / "mask.safetensors")
    delta_lib.save(delta_lib.from_mask(mask, shapes), path)
    return path, mask


def test_training_under_a_mask_changes_only_masked_entries(mask_file):
    path, mask = mask_file
    config, setup = _setup(dict(name="sparse", mask=path, dense=(r"classifier/.*",)))
    state = loop.init_state(config, setup)
    trainable = tree.flatten(state["trainable"])
    assert all(p.startswith("sparse/") and p.endswith("/value") or p.startswith("classifier/")
               for p in trainable)
    assert set(tree.flatten(state["opt_state"][1].mu)) == set(trainable)  # Adam: K entries
    assert sum(v.size for p, v in trainable.items() if p.startswith("sparse/")) == \
        masks.count(mask, setup.model.param_shapes())
    before = setup.method.model_params(jax.device_get(tree.combine(state["trainable"],
                                                                   state["frozen"])))
    step = loop.make_train_step(setup)
    for index in range(3):
        state, _ = step(state, _batch(setup, 8, 16, seed=index))
    params = jax.device_get(tree.combine(state["trainable"], state["frozen"]))
    after = tree.flatten(setup.method.model_params(params))
    flat_mask = tree.flatten(mask)
    for leaf, old in tree.flatten(before).items():
        new, old = np.asarray(after[leaf]), np.asarray(old)
        if leaf.startswith("classifier/"):
            assert not np.array_equal(new, old)
            continue
        chosen = np.asarray(flat_mask[leaf], bool) & np.ones(old.shape, bool)
        assert (new[~chosen].view(np.uint32) == old[~chosen].view(np.uint32)).all(), leaf
        if chosen.any():
            assert np.any(new[chosen] != old[chosen]), leaf
    exported = setup.method.sparse_delta(params, before)
    rebuilt = tree.flatten(delta_lib.apply(before, exported))
    for leaf, value in after.items():
        np.testing.assert_allclose(rebuilt[leaf], value, atol=1e-6, err_msg=leaf)


def test_sparse_method_bad_input_is_one_line(mask_file, tmp_path):
    path, _ = mask_file
    with pytest.raises(ValueError, match="no such file"):
        SparseFT(mask=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="encoder/layer_0/attn/out/kernel|shape") as info:
        _setup(dict(name="sparse", mask=path), hidden=48)
    assert "\n" not in str(info.value)
