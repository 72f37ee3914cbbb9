"""Tree core: paths, rules (first match wins, unmatched rules fail), algebra, split/combine."""

import numpy as np
import pytest

from research import tree


def params():
    return {
        "encoder": {
            "layer_0": {"attn": {"query": {"kernel": np.ones((4, 2, 2)), "bias": np.zeros((2, 2))}},
                        "mlp": {"wi": {"kernel": np.full((4, 8), 2.0)}}},
        },
        "classifier": {"kernel": np.arange(8.0).reshape(4, 2)},
    }


def test_flatten_unflatten_round_trip():
    flat = tree.flatten(params())
    assert list(flat) == ["encoder/layer_0/attn/query/kernel", "encoder/layer_0/attn/query/bias",
                          "encoder/layer_0/mlp/wi/kernel", "classifier/kernel"]
    assert tree.flatten(tree.unflatten(flat)).keys() == flat.keys()


def test_rules_first_match_wins_and_default():
    values = tree.resolve_rules([(".*query/.*", 1), (".*kernel", 2)], tree.flatten(params()),
                                default=0)
    assert values == {"encoder/layer_0/attn/query/kernel": 1, "encoder/layer_0/attn/query/bias": 1,
                      "encoder/layer_0/mlp/wi/kernel": 2, "classifier/kernel": 2}


def test_rule_matching_nothing_names_closest_paths():
    with pytest.raises(ValueError, match=r"'.*qurey.*' matches no parameter; closest: .*query"):
        tree.tree_from_rules([(".*qurey/kernel", 1)], params())


def test_rules_are_full_matches():
    mask = tree.mask_from_patterns(["kernel"], {"kernel": 1, "a": {"kernel": 2}})
    assert mask == {"kernel": True, "a": {"kernel": False}}


def test_map_with_path():
    shapes = tree.map_with_path(lambda p, x: (p.split("/")[-1], x.shape), params())
    assert shapes["classifier"]["kernel"] == ("kernel", (4, 2))


def test_algebra():
    a, b = params(), tree.scale(params(), 3.0)
    np.testing.assert_allclose(tree.flatten(tree.sub(b, a))["classifier/kernel"],
                               2 * np.arange(8.0).reshape(4, 2))
    np.testing.assert_allclose(tree.flatten(tree.lerp(a, b, 0.5))["classifier/kernel"],
                               2 * np.arange(8.0).reshape(4, 2))
    np.testing.assert_allclose(tree.flatten(tree.add(a, a))["encoder/layer_0/mlp/wi/kernel"], 4.0)
    flat_b = tree.flatten(b)
    expected_dot = sum(float(np.sum(x * flat_b[p])) for p, x in tree.flatten(a).items())
    np.testing.assert_allclose(tree.dot(a, b), expected_dot, rtol=1e-6)
    np.testing.assert_allclose(tree.norm(a) ** 2, tree.dot(a, a), rtol=1e-6)
    np.testing.assert_allclose(tree.cosine(a, b), 1.0, rtol=1e-6)
    assert tree.count(a) == 16 + 4 + 32 + 8


def test_combining_different_structures_names_path_and_shapes():
    other = params()
    other["classifier"]["kernel"] = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"'classifier/kernel': shape \(4, 2\) vs \(4, 3\)"):
        tree.add(params(), other)
    del other["classifier"]
    with pytest.raises(ValueError, match="'classifier/kernel': present in the first tree only"):
        tree.lerp(params(), other, 0.5)


def test_split_combine_round_trip():
    p = params()
    trainable = tree.mask_from_patterns([".*kernel"], p)
    train, frozen = tree.split(p, trainable)
    assert list(tree.flatten(frozen)) == ["encoder/layer_0/attn/query/bias"]
    back = tree.combine(train, frozen)
    assert tree.flatten(back).keys() == tree.flatten(p).keys()
    with pytest.raises(ValueError, match="both the trainable and frozen"):
        tree.combine(train, train)


def test_structural_diff():
    old = params()
    new = params()
    new["classifier"]["kernel"] = np.zeros((4, 3), np.float32)
    new["classifier"]["bias"] = np.zeros(3)
    del new["encoder"]["layer_0"]["mlp"]
    diff = tree.structural_diff(old, new)
    assert diff["added"] == ["classifier/bias"]
    assert diff["removed"] == ["encoder/layer_0/mlp/wi/kernel"]
    assert diff["changed_shape"] == [("classifier/kernel", (4, 2), (4, 3))]
    assert diff["changed_dtype"] == [("classifier/kernel", "float64", "float32")]
