"""Magnitude pruning and sparse regularisation: exactly the requested share of the selected
entries is kept (the largest, ties broken by position), globally or per leaf, and every other
leaf is bit-identical; the sparse_reg term is λ·Σ|θ| (or λ·Σ_g‖θ_g‖₂) over the selected leaves
and its gradient step shrinks them; bad input is a one-line error naming the rule or option."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import methods, models, tree
from research.sparse import prune as prune_lib
from research.sparse.prune import SparseRegularised, block_kernels, magnitude_prune

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0)
SELECTED = r"encoder/layer_\d+/.*/kernel"


@pytest.fixture(scope="module")
def tiny():
    model = models.build("bert_tiny_classifier", **TINY)
    rng = np.random.default_rng(0)
    # Values from a few levels: many exact ties in |θ|, signs both ways.
    params = jax.tree.map(lambda s: jnp.asarray(rng.integers(-4, 5, s.shape) * 0.25, jnp.float32),
                          model.param_shapes())
    return model, params


def selected_paths(params):
    return [p for p in tree.flatten(params) if re.fullmatch(SELECTED, p)]


def bits(x):
    return np.asarray(x).view(np.uint32)


def check_kept_entries(original, pruned, mask, keep):
    """``keep`` entries kept, the others zero, and none dropped larger than one kept."""
    values = np.concatenate([np.asarray(original[p]).ravel() for p in mask])
    kept = np.concatenate([np.asarray(mask[p]).ravel() for p in mask])
    result = np.concatenate([np.asarray(pruned[p]).ravel() for p in mask])
    assert kept.sum() == keep
    np.testing.assert_array_equal(result, np.where(kept, values, 0))
    assert np.abs(values[kept]).min() >= np.abs(values[~kept]).max()


@pytest.mark.parametrize("density", [0.5, 0.3, 0.1])
def test_global_pruning_keeps_exactly_the_share_and_leaves_the_rest_untouched(tiny, density):
    _, params = tiny
    pruned, mask = magnitude_prune(params, block_kernels(density))
    flat, flat_pruned, flat_mask = map(tree.flatten, (params, pruned, mask))
    chosen = selected_paths(params)
    total = sum(flat[p].size for p in chosen)
    check_kept_entries(flat, flat_pruned, {p: flat_mask[p] for p in chosen},
                       max(1, int(density * total)))
    for path in flat:
        if path not in chosen:
            assert flat_mask[path] is True
            np.testing.assert_array_equal(bits(flat_pruned[path]), bits(flat[path]))


def test_leaf_scope_ranks_each_leaf_alone(tiny):
    _, params = tiny
    pruned, mask = magnitude_prune(params, block_kernels(0.3), scope="leaf")
    flat, flat_pruned, flat_mask = map(tree.flatten, (params, pruned, mask))
    for path in selected_paths(params):
        check_kept_entries(flat, flat_pruned, {path: flat_mask[path]},
                           max(1, int(0.3 * flat[path].size)))


def test_rules_group_leaves_by_density_and_none_excludes(tiny):
    _, params = tiny
    rules = ((r".*/attn/out/kernel", None), (r".*/attn/.*/kernel", 0.5), (SELECTED, 0.2))
    pruned, mask = magnitude_prune(params, rules)
    flat, flat_pruned, flat_mask = map(tree.flatten, (params, pruned, mask))
    attention = [p for p in selected_paths(params) if "/attn/" in p and "/out/" not in p]
    mlp = [p for p in selected_paths(params) if "/mlp/" in p]
    for paths, density in ((attention, 0.5), (mlp, 0.2)):
        check_kept_entries(flat, flat_pruned, {p: flat_mask[p] for p in paths},
                           max(1, int(density * sum(flat[p].size for p in paths))))
    out = "encoder/layer_0/attn/out/kernel"
    assert flat_mask[out] is True
    np.testing.assert_array_equal(bits(flat_pruned[out]), bits(flat[out]))


@pytest.mark.parametrize("density", [0.0, 1.5, -0.2])
def test_density_outside_unit_interval_is_a_one_line_error(tiny, density):
    _, params = tiny
    message = r"prune rule '\(encoder.*': density=.* is outside \(0, 1\]"
    with pytest.raises(ValueError, match=message) as err:
        magnitude_prune(params, block_kernels(density))
    assert "\n" not in str(err.value)


def test_bad_scope_and_unmatched_rule_are_errors(tiny):
    _, params = tiny
    with pytest.raises(ValueError, match="scope='layer' is not one of"):
        magnitude_prune(params, block_kernels(0.5), scope="layer")
    with pytest.raises(ValueError, match="prune rule 'decoder/.*' matches no parameter"):
        magnitude_prune(params, (("decoder/.*", 0.5),))


def test_l1_term_is_lambda_times_abs_sum_and_its_gradient_shrinks_weights(tiny):
    model, params = tiny
    method = methods.build(dict(name="sparse_reg", strength=0.01))
    assert isinstance(method, SparseRegularised)
    ids = np.arange(1, 25, dtype=np.int32).reshape(2, 12)
    (outputs, terms), plain = jax.jit(lambda p: (
        method.apply(model.module, {"params": p}, ids)[:2],
        model.module.apply({"params": p}, ids)))(params)
    np.testing.assert_array_equal(outputs, plain)

    flat = tree.flatten(params)
    chosen = selected_paths(params)
    expected = 0.01 * sum(np.abs(np.asarray(flat[p], np.float64)).sum() for p in chosen)
    np.testing.assert_allclose(float(terms["sparsity"]), expected, rtol=1e-6)
    grads = tree.flatten(jax.jit(jax.grad(lambda p: 0.01 * prune_lib.sparsity_penalty(
        p, method.targets, method.group_axes)))(params))
    for path, value in flat.items():
        value = np.asarray(value)
        if path in chosen:
            nonzero = value != 0  # |θ| has only a subgradient at 0
            np.testing.assert_allclose(grads[path][nonzero], 0.01 * np.sign(value[nonzero]))
            stepped = np.abs(value - grads[path])
            assert np.all(stepped[nonzero] < np.abs(value)[nonzero])
        else:
            assert not np.any(grads[path])


def test_group_l1_over_heads_and_channels(tiny):
    _, params = tiny
    method = SparseRegularised(strength=0.1, group_axes=prune_lib.HEADS_AND_CHANNELS)
    flat = tree.flatten(params)
    query, wo = flat["encoder/layer_0/attn/query/kernel"], flat["encoder/layer_0/mlp/wo/kernel"]
    only = SparseRegularised(strength=0.1, group_axes=prune_lib.HEADS_AND_CHANNELS,
                             targets=((r"encoder/layer_0/(attn/query|mlp/wo)/kernel", True),))
    expected = (np.linalg.norm(np.asarray(query).transpose(1, 0, 2).reshape(4, -1), axis=1).sum()
                + np.linalg.norm(np.asarray(wo), axis=1).sum())
    penalty = prune_lib.sparsity_penalty(params, only.targets, only.group_axes)
    np.testing.assert_allclose(float(0.1 * penalty), 0.1 * expected, rtol=1e-5)
    grads = tree.flatten(jax.jit(jax.grad(lambda p: prune_lib.sparsity_penalty(
        p, method.targets, method.group_axes)))(params))
    stepped = np.asarray(query) - 0.1 * grads["encoder/layer_0/attn/query/kernel"]
    heads = lambda k: np.linalg.norm(k.transpose(1, 0, 2).reshape(4, -1), axis=1)  # noqa: E731
    assert np.all(heads(stepped) < heads(np.asarray(query)))


def test_method_errors_name_the_option():
    model = models.build("bert_tiny_classifier", **TINY)
    with pytest.raises(ValueError, match=r"config.method.strength=-1.0 must be >= 0"):
        methods.build(dict(name="sparse_reg", strength=-1.0))
    method = SparseRegularised(targets=(("decoder/.*/kernel", True),))
    with pytest.raises(ValueError, match="sparse_reg target 'decoder/.*/kernel' matches no"):
        jax.eval_shape(method.init, jax.random.key(0), model.param_shapes())
