"""OT fusion of transformers: the solvers against scipy and their marginals; a randomly permuted
copy computes the same function and alignment recovers the original exactly (hard, weights or
activations; also weight matching) or within tolerance (soft, small epsilon); fusing a model
with itself returns it; residual policies; heterogeneous fusion gives the narrower model's
shapes and runs; bad input is a one-line error naming the map, leaf or batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from research import models, tree
from research.fusion import activations, align, matching, solvers, spec as spec_lib

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, max_length=16,
            hidden_dropout=0.0, attention_dropout=0.0)
MODELS = {
    "vit": ("vit_tiny_classifier", dict(hidden_size=32, num_heads=4, mlp_dim=64)),
    "bert": ("bert_tiny_mlm", dict(TINY, vocab_size=50)),
    "llama": ("llama_tiny_lm", dict(hidden_size=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                                    vocab_size=50, max_length=16)),  # GQA, rotary
}


def random_params(model, seed):
    # Scales away from init (norm scales and biases too) so no unit is a copy of another.
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), jnp.float32),
                        model.param_shapes())


def inputs_for(model, seed=0, batch=4, length=8):
    rng = np.random.default_rng(seed)
    if model.family == "vit":
        c = model.config
        return {"image": rng.random((batch, c.image_size, c.image_size, c.num_channels),
                                    np.float32)}
    return {"input_ids": rng.integers(0, model.config.vocab_size, (batch, length), np.int32)}


def forward(model, params, inputs):
    return model.module.apply({"params": params}, **inputs)


def max_error(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(tree.flatten(a)),
                                                             jax.tree.leaves(tree.flatten(b))))


@functools.cache
def permuted_copy(family):
    name, overrides = MODELS[family]
    model = models.build(name, **overrides)
    spec = spec_lib.spec_for(model)
    params = random_params(model, 0)
    maps = align.random_permutation(spec, params, jax.random.key(1))
    return model, spec, params, align.apply_maps(spec, maps, params)


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------


def test_assignment_is_scipys_hungarian_batched_and_rectangular():
    cost = np.random.default_rng(0).random((3, 5, 7, 9)).astype(np.float32)
    plan = np.asarray(solvers.assignment(cost))
    for index in np.ndindex(3, 5):
        rows, columns = linear_sum_assignment(cost[index])
        assert (plan[index].argmax(1) == columns).all()
        np.testing.assert_allclose(plan[index].sum(1), 1 / 7)


def test_sinkhorn_meets_its_marginals_and_sharpens_to_the_assignment():
    rng = np.random.default_rng(1)
    cost = rng.random((6, 8)).astype(np.float32)
    a, b = rng.random(6) + 0.5, rng.random(8) + 0.5
    a, b = a / a.sum(), b / b.sum()
    plan = np.asarray(solvers.sinkhorn(cost, 0.1, a, b, tolerance=1e-7))
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-5)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-5)
    points = rng.normal(size=(6, 4))
    square = ((points[:, None] - points[None, rng.permutation(6)]) ** 2).sum(-1)
    sharp = np.asarray(solvers.to_map(solvers.sinkhorn(square, 1e-2)))
    np.testing.assert_allclose(sharp, np.asarray(solvers.to_map(solvers.assignment(square))),
                               atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Permuted copies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(MODELS))
def test_permuted_copy_computes_the_same_function(family):
    model, _, params, copy = permuted_copy(family)
    inputs = inputs_for(model)
    assert max_error(params, copy) > 0.1
    np.testing.assert_allclose(forward(model, copy, inputs), forward(model, params, inputs),
                               atol=1e-5)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("options", [align.Options(solver="exact"),
                                     align.Options(solver="exact", cost="activations")],
                         ids=["weights", "activations"])
def test_hard_alignment_recovers_the_original_exactly(family, options):
    model, spec, params, copy = permuted_copy(family)
    stats = (activations.collect(spec, model, params, model, copy, [inputs_for(model)])
             if options.cost == "activations" else None)
    maps = align.align(spec, params, copy, options, stats)
    assert max_error(align.apply_maps(spec, maps, copy), params) == 0


# ViT (pre-LN) and Llama (GQA, rotary): BERT's post-LN flow is covered by the hard case.
@pytest.mark.parametrize("family", ["vit", "llama"])
def test_soft_alignment_at_small_epsilon_recovers_within_tolerance(family):
    model, spec, params, copy = permuted_copy(family)
    maps = align.align(spec, params, copy, align.Options(solver="sinkhorn", epsilon=1e-3))
    assert max_error(align.apply_maps(spec, maps, copy), params) < 1e-3


@pytest.mark.parametrize("family", ["vit", "llama"])
def test_weight_matching_recovers_the_original(family):
    _, spec, params, copy = permuted_copy(family)
    maps = matching.weight_matching(spec, params, copy)
    assert max_error(align.apply_maps(spec, maps, copy), params) == 0


def test_aligning_two_models_by_permutations_keeps_the_function():
    name, overrides = MODELS["llama"]
    model = models.build(name, **overrides)
    spec = spec_lib.spec_for(model)
    a, b = random_params(model, 0), random_params(model, 1)
    inputs = inputs_for(model)
    aligned = align.apply_maps(spec, matching.weight_matching(spec, a, b), b)
    assert max_error(aligned, b) > 0.1
    np.testing.assert_allclose(forward(model, aligned, inputs), forward(model, b, inputs),
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_fusing_a_model_with_itself_returns_it(solver):
    name, overrides = MODELS["vit"]
    model = models.build(name, **overrides)
    spec = spec_lib.spec_for(model)
    params = random_params(model, 0)
    options = align.Options(solver=solver, epsilon=1e-3)
    fused = align.fuse(spec, params, [params, params], options=options)
    assert max_error(fused, params) < (1e-6 if solver == "exact" else 1e-3)


def test_fusion_averages_the_aligned_models_with_the_weights():
    name, overrides = MODELS["vit"]
    model = models.build(name, **overrides)
    spec = spec_lib.spec_for(model)
    a, b = random_params(model, 0), random_params(model, 1)
    options = align.Options(solver="exact")
    aligned = align.apply_maps(spec, align.align(spec, a, b, options), b)
    fused = align.fuse(spec, a, [b], [0.25, 0.75], options)
    assert max_error(fused, tree.lerp(a, aligned, 0.75)) < 1e-6


def test_residual_policies_set_the_stream_maps():
    name, overrides = MODELS["vit"]
    model = models.build(name, **overrides)
    spec = spec_lib.spec_for(model)
    a, b = random_params(model, 0), random_params(model, 1)
    residuals = [s for s in spec.steps if isinstance(s, spec_lib.Residual)]
    policies = ((r"layer_0/attn", "incoming"), (r"layer_0/mlp", 0.3), (r".*", "average"))
    maps = align.align(spec, a, b, align.Options(residual=policies))
    first, second = residuals[:2]
    np.testing.assert_array_equal(maps[first.name], maps["embed"])
    np.testing.assert_allclose(maps[second.name],
                               0.3 * maps[first.name] + 0.7 * maps[second.out.name], atol=1e-6)
    single = align.align(spec, a, b, align.Options(solver="exact",
                                                  residual=((".*", "incoming"),)))
    for step in residuals:
        np.testing.assert_array_equal(single[step.name], single["embed"])


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_heterogeneous_fusion_has_the_narrow_models_shapes_and_runs(solver):
    narrow = models.build("vit_tiny_classifier", hidden_size=32, num_heads=4, mlp_dim=64)
    wide = models.build("vit_tiny_classifier", hidden_size=48, num_heads=6, head_dim=12,
                        mlp_dim=128)
    spec = spec_lib.spec_for(narrow)
    a, b = random_params(narrow, 0), random_params(wide, 1)
    inputs = inputs_for(narrow)
    stats = activations.collect(spec, narrow, a, wide, b, [inputs])
    fused = align.fuse(spec, a, [b], options=align.Options(solver=solver, cost="activations"),
                       stats=[stats])
    assert {p: v.shape for p, v in tree.flatten(fused).items()} == \
        {p: v.shape for p, v in tree.flatten(a).items()}
    assert np.isfinite(np.asarray(forward(narrow, fused, inputs))).all()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_a_one_line_error():
    name, overrides = MODELS["vit"]
    model = models.build(name, **overrides)
    spec = spec_lib.spec_for(model)
    a = random_params(model, 0)

    def error(fn, match):
        with pytest.raises(ValueError, match=match) as info:
            fn()
        assert "\n" not in str(info.value)

    deeper = random_params(models.build(name, **overrides, num_layers=3), 1)
    error(lambda: align.align(spec, a, deeper), "'encoder/layer_2/.*' is only in B")
    other_patch = random_params(models.build(name, **overrides, patch_size=4), 1)
    error(lambda: align.align(spec, a, other_patch),
          r"leaf 'embeddings/patch/kernel': axis 0 has no transport map")
    more_heads = random_params(models.build(name, **dict(overrides, num_heads=8, head_dim=8)), 1)
    error(lambda: align.align(spec, a, more_heads, align.Options(heads="per_head")),
          r"layer_0/attn/qk: heads='per_head' needs equal head counts, got 4 \(A\) and 8")
    narrow = random_params(models.build(name, **dict(overrides, mlp_dim=32)), 1)
    error(lambda: align.align(spec, a, narrow, align.Options(solver="exact")),
          r"map layer_0/mlp/hidden: A has 64 units and B 32")
    nan = tree.map_with_path(lambda p, v: v.at[0].set(jnp.nan) if p.endswith("wi/kernel")
                             else v, a)
    error(lambda: align.align(spec, a, nan), r"map layer_0/mlp/hidden: the 64x64 cost has "
                                             "non-finite entries")
    error(lambda: align.align(spec, a, a, align.Options(cost="activations")),
          "needs activation statistics")
    error(lambda: activations.collect(spec, model, a, model, a, []), "at least one batch")
    error(lambda: activations.collect(spec, model, a, model, a, [{"label": np.zeros(2)}]),
          "activation batch 0 lacks 'image'")
    error(lambda: align.Options(solver="hungarian"), "solver='hungarian' is not one of")
    error(lambda: align.Options(residual=((".*", "sum"),)), "policy 'sum' for '.*'")
    error(lambda: align.Options(solver="exact", marginals="importance"), "needs solver")
    error(lambda: align.fuse(spec, a, [a], [0.5, 0.6]), "must be 2 numbers")
    gqa = models.build("llama_tiny_lm", **MODELS["llama"][1])
    mha = models.build("llama_tiny_lm", **dict(MODELS["llama"][1], num_kv_heads=4))
    error(lambda: align.align(spec_lib.spec_for(gqa), random_params(gqa, 0),
                              random_params(mha, 1)),
          r"layer_0/attn: A has 2 query heads per key/value head and B 1")
