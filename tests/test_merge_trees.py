"""Merge methods over parameter trees, checked against what their papers define (parity with
mergekit itself is in test_mergekit_parity.py).

Soups are weighted means; task arithmetic adds weighted task vectors and a weight of -1 undoes
one; TIES keeps exactly k entries per task vector, elects signs by summed mass and averages the
agreeing entries; DARE keeps a density fraction, preserves the L1 norm and is unbiased over
seeds; Breadcrumbs drops the top gamma and the bottom; DELLA keeps big entries more often;
Model Stock interpolates by N cos / (1 + (N-1) cos), per row with filter_wise; SLERP moves along
the arc; NuSLERP's weights give t; per-path rules, layer gradients and per-model settings
resolve as documented; bad input is a one-line error naming the path; non-float leaves come
from the base; task vectors round-trip.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from research import tree
from research.merge import sparsify, trees

D = 8


def make_tree(rng, layers=3, scale=1.0):
    """A small BERT-shaped tree of float32 leaves plus an integer leaf."""
    def normal(*shape):
        return (scale * rng.standard_normal(shape)).astype(np.float32)
    encoder = {f"layer_{i}": {"attn": {"query": {"kernel": normal(D, D)}},
                              "mlp": {"kernel": normal(D, 2 * D), "bias": normal(2 * D)}}
               for i in range(layers)}
    return {"embed": {"embedding": normal(16, D),
                      "position_ids": np.arange(16, dtype=np.int32)},
            "encoder": encoder,
            "head": {"kernel": normal(D, 3), "bias": normal(3)}}


def finetune(base, rng, scale=0.1):
    """``base`` plus small noise on every float leaf (integer leaves shifted, to tell them
    apart)."""
    return tree.map_with_path(
        lambda _, x: (x + scale * rng.standard_normal(x.shape).astype(np.float32)
                      if np.asarray(x).dtype.kind == "f" else x + 1), base)


def floats(t) -> dict[str, np.ndarray]:
    """``{path: float64 array}`` of the float leaves."""
    return {p: np.asarray(x, np.float64) for p, x in tree.flatten(t).items()
            if np.asarray(x).dtype.kind == "f"}


def without_integers(t):
    return tree.unflatten({p: x for p, x in tree.flatten(t).items()
                           if np.asarray(x).dtype.kind == "f"})


def assert_trees_close(got, expected, atol=1e-5):
    """The float leaves of ``got`` equal ``expected``'s (tree algebra makes integer leaves
    float; those are checked on their own)."""
    fg, fe = floats(got), tree.flatten(expected)
    assert fg and fe.keys() >= fg.keys()
    for path in fg:
        np.testing.assert_allclose(fg[path], np.asarray(fe[path], np.float64), atol=atol,
                                   rtol=1e-5, err_msg=path)


def delta(merged, base) -> dict[str, np.ndarray]:
    fm, fb = floats(merged), floats(base)
    return {p: fm[p] - fb[p] for p in fm}


@pytest.fixture(scope="module")
def family():
    rng = np.random.default_rng(0)
    base = make_tree(rng)
    return base, [finetune(base, rng) for _ in range(3)]


# ---------------------------------------------------------------------------------------------
# Linear soups and task arithmetic
# ---------------------------------------------------------------------------------------------


def test_linear_soup_is_the_weighted_mean(family):
    _, models = family
    fl = [floats(m) for m in models]
    uniform = floats(trees.merge("linear", models, parameters={"weight": 1.0}))
    weighted = floats(trees.merge("linear", models[:2],
                                  model_parameters=[{"weight": 1.0}, {"weight": 3.0}]))
    exact = floats(trees.merge("linear", models[:2], parameters={"normalize": False},
                               model_parameters=[{"weight": 0.25}, {"weight": 0.75}]))
    for path in fl[0]:
        np.testing.assert_allclose(uniform[path], sum(f[path] for f in fl) / 3, atol=1e-6)
        expected = (fl[0][path] + 3 * fl[1][path]) / 4
        np.testing.assert_allclose(weighted[path], expected, atol=1e-6)
        np.testing.assert_allclose(exact[path], expected, atol=1e-6)


def test_task_arithmetic_adds_weighted_task_vectors_scaled_by_lambda(family):
    base, models = family
    taus = [delta(m, base) for m in models]
    weights = [0.5, -0.3, 1.2]
    mp = [{"weight": w} for w in weights]
    plain = delta(trees.merge("task_arithmetic", models, base, model_parameters=mp), base)
    scaled = delta(trees.merge("task_arithmetic", models, base, model_parameters=mp,
                               parameters={"lambda": 0.4}), base)
    for path in plain:
        expected = sum(w * t[path] for w, t in zip(weights, taus))
        np.testing.assert_allclose(plain[path], expected, atol=1e-5)
        np.testing.assert_allclose(scaled[path], 0.4 * expected, atol=1e-5)


def test_negating_a_task_then_adding_it_back_returns_the_base(family):
    base, tuned = without_integers(family[0]), without_integers(family[1][0])
    undone = trees.merge("task_arithmetic", [tuned, tuned], base,
                         model_parameters=[{"weight": -1.0}, {"weight": 1.0}])
    assert_trees_close(undone, base)
    negated = trees.merge("task_arithmetic", [tuned], base, parameters={"weight": -1.0})
    assert_trees_close(negated, tree.sub(tree.scale(base, 2.0), tuned))  # base - tau
    assert_trees_close(trees.apply_task_vectors(negated, [trees.task_vector(tuned, base)]), base)


# ---------------------------------------------------------------------------------------------
# TIES
# ---------------------------------------------------------------------------------------------


def test_ties_trimming_keeps_exactly_k_largest_entries_per_task_vector(family):
    base, (tuned, *_) = family
    trimmed = delta(trees.merge("ties", [tuned], base, parameters={
        "weight": 1.0, "density": 0.3, "normalize": False}), base)
    tau = delta(tuned, base)
    for path, kept in trimmed.items():
        n = kept.size
        k = max(1, int(0.3 * n))  # head/bias: int(0.9) = 0, still one entry survives
        survivors = kept != 0
        assert survivors.sum() == k, path
        largest = np.argsort(-np.abs(tau[path]).ravel())[:k]
        assert set(np.flatnonzero(survivors)) == set(largest), path
        np.testing.assert_allclose(kept[survivors], tau[path][survivors], atol=1e-6)


def test_ties_sign_election_on_a_hand_built_example():
    base = {"w": np.zeros(5, np.float32)}
    models = [{"w": np.array(v, np.float32)} for v in
              ([2, -3, 1, 0, 5], [-1, -1, 1, 0, -2], [1, 2, -4, 0, -1])]
    # Summed mass [2, -2, -2, 0, 2] elects [+, -, -, +, +]; each entry is the mean of the
    # entries that agree with its sign; the all-zero entry has no agreeing model.
    merged = trees.merge("ties", models, base, parameters={"weight": 1.0, "density": 1.0})
    np.testing.assert_allclose(merged["w"], [1.5, -2, -4, 0, 5])


def test_ties_trims_before_electing_and_unsurvived_entries_stay_at_the_base():
    base = {"w": np.full(4, 10.0, np.float32)}
    models = [{"w": 10 + np.array(v, np.float32)} for v in ([4, 0.1, -3, 0.2],
                                                            [-5, 0.3, 2, -0.1])]
    # density 0.5 keeps 2 of 4: [4, 0, -3, 0] and [-5, 0, 2, 0]; masses [-1, 0, -1, 0].
    merged = trees.merge("ties", models, base, parameters={"weight": 1.0, "density": 0.5})
    np.testing.assert_allclose(merged["w"], [5, 10, 7, 10])


def test_ties_merged_delta_follows_the_elected_sign_on_random_trees(family):
    base, models = family
    trimmed = [delta(trees.merge("ties", [m], base, parameters={
        "weight": 1.0, "density": 0.4, "normalize": False}), base) for m in models]
    merged = delta(trees.merge("ties", models, base,
                               parameters={"weight": 1.0, "density": 0.4}), base)
    disagreements = 0
    for path, got in merged.items():
        stack = np.stack([t[path] for t in trimmed])
        mass = stack.sum(0)
        elected = np.where(mass >= 0, 1.0, -1.0)
        agrees = np.sign(stack) == elected
        count = agrees.sum(0)
        expected = np.where(agrees, stack, 0).sum(0) / np.maximum(count, 1)
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=path)
        conflict = (stack > 0).any(0) & (stack < 0).any(0)
        disagreements += conflict.sum()
        assert np.all(np.sign(got[conflict]) == np.sign(mass[conflict])), path
        assert np.all(got[count == 0] == 0), path
    assert disagreements > 50  # the sign election was exercised


# ---------------------------------------------------------------------------------------------
# Random drops: DARE and DELLA
# ---------------------------------------------------------------------------------------------


def big_pair(seed=0, shape=(250, 400)):
    """A base and one fine-tune with 10^5-entry leaves (statistics need them)."""
    rng = np.random.default_rng(seed)
    base = {"a": {"kernel": rng.standard_normal(shape).astype(np.float32)},
            "b": {"kernel": rng.standard_normal(shape).astype(np.float32)}}
    tuned = {k: {"kernel": v["kernel"] + rng.standard_normal(shape).astype(np.float32)}
             for k, v in base.items()}
    return base, tuned


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keeps_density_fraction_and_preserves_l1_norm(method):
    base, tuned = big_pair()
    tau = delta(tuned, base)
    merged = delta(trees.merge(method, [tuned], base,
                               parameters={"weight": 1.0, "density": 0.3}), base)
    for path, got in merged.items():
        kept = got != 0
        assert abs(kept.mean() - 0.3) < 0.01, (path, kept.mean())
        np.testing.assert_allclose(np.abs(got).sum(), np.abs(tau[path]).sum(), rtol=1e-4)
        # Survivors are rescaled by one factor, ~1/density (tiny entries lose digits to the
        # float32 base they are added to).
        clear = kept & (np.abs(tau[path]) > 0.1)
        ratio = got[clear] / tau[path][clear]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)
        assert abs(ratio[0] - 1 / 0.3) < 0.1
    assert not np.array_equal(merged["a/kernel"] != 0, merged["b/kernel"] != 0)


def test_dare_is_unbiased_over_seeds_and_seeded():
    base, tuned = big_pair()
    tau = delta(tuned, base)["a/kernel"]
    density, seeds = 0.5, 24
    params = {"weight": 1.0, "density": density}
    draws = [delta(trees.merge("dare_linear", [tuned], base, parameters=params, seed=s),
                   base)["a/kernel"] for s in range(seeds)]
    mean = np.mean(draws, axis=0)
    # E[mean] = tau: the projection onto tau is 1, the residual shrinks like 1/sqrt(seeds).
    assert abs(np.vdot(mean, tau) / np.vdot(tau, tau) - 1) < 0.01
    relative = np.linalg.norm(mean - tau) / np.linalg.norm(tau)
    expected = np.sqrt((1 - density) / (density * seeds))
    assert 0.8 * expected < relative < 1.2 * expected, (relative, expected)
    assert not np.array_equal(draws[0], draws[1])
    again = delta(trees.merge("dare_linear", [tuned], base, parameters=params, seed=0), base)
    np.testing.assert_array_equal(again["a/kernel"], draws[0])


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_keeps_large_entries_more_often(method):
    base, tuned = big_pair(shape=(100, 1000))
    tau = delta(tuned, base)["a/kernel"]
    density, epsilon = 0.5, 0.3
    merged = delta(trees.merge(method, [tuned], base, parameters={
        "weight": 1.0, "density": density, "epsilon": epsilon}), base)["a/kernel"]
    kept = merged != 0
    assert abs(kept.mean() - density) < 0.01
    np.testing.assert_allclose(np.abs(merged).sum(), np.abs(tau).sum(), rtol=1e-4)
    # Keep probability rises linearly with the rank of |tau| within the row, from
    # density - epsilon to density + epsilon.
    ranks = np.argsort(np.argsort(np.abs(tau), axis=1), axis=1) / (tau.shape[1] - 1)
    bins = np.minimum((ranks * 10).astype(int), 9)
    fractions = np.array([kept[bins == b].mean() for b in range(10)])
    expected = density - epsilon + 2 * epsilon * (np.arange(10) + 0.5) / 10
    np.testing.assert_allclose(fractions, expected, atol=0.025)
    assert np.all(np.diff(fractions) > 0)


# ---------------------------------------------------------------------------------------------
# Breadcrumbs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_drops_outliers_and_the_smallest(method):
    rng = np.random.default_rng(0)
    n = 27 * 37  # 999: int(density * n) rounds down
    magnitudes = rng.permutation(n) + 1.0
    tau = (magnitudes * rng.choice([-1, 1], n)).reshape(27, 37).astype(np.float32)
    base = {"w": np.zeros((27, 37), np.float32)}
    order = np.argsort(magnitudes)  # ascending
    for density, gamma, kept_ranks in [(0.5, 0.1, slice(401, 900)),  # bottom 401, top 99
                                       (0.95, 0.1, slice(0, 949))]:  # too few to drop 99
        merged = np.asarray(trees.merge(method, [{"w": tau}], base, parameters={
            "weight": 1.0, "density": density, "gamma": gamma})["w"]).ravel()
        kept = np.flatnonzero(merged)
        assert len(kept) == int(density * n)
        assert set(kept) == set(order[kept_ranks])
        np.testing.assert_array_equal(merged[kept], tau.ravel()[kept])


# ---------------------------------------------------------------------------------------------
# Model Stock
# ---------------------------------------------------------------------------------------------


def stock_offsets(rng, dim, count, cos):
    """``count`` equal-norm vectors in R^dim with pairwise cosine ``cos``."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, count + 1)))
    return [np.sqrt(cos) * q[:, 0] + np.sqrt(1 - cos) * q[:, i + 1] for i in range(count)]


def stock_ratio(count, cos):
    return count * cos / (1 + (count - 1) * cos)


@pytest.mark.parametrize("count", [2, 3])
def test_model_stock_ratio_follows_the_angle(count):
    rng = np.random.default_rng(count)
    cosines = {"encoder/layer_0/mlp/kernel": 0.3, "head/kernel": 0.8}
    base, models = {}, [{} for _ in range(count)]
    for path, cos in cosines.items():
        w0 = rng.standard_normal((8, 16))
        base[path] = w0.astype(np.float32)
        for model, d in zip(models, stock_offsets(rng, 128, count, cos)):
            model[path] = (w0 + 0.5 * d.reshape(8, 16)).astype(np.float32)
    base, models = tree.unflatten(base), [tree.unflatten(m) for m in models]
    merged = floats(trees.merge("model_stock", models, base))
    fb, fm = floats(base), [floats(m) for m in models]
    for path, cos in cosines.items():
        average = sum(m[path] for m in fm) / count
        t = stock_ratio(count, cos)
        np.testing.assert_allclose(merged[path], t * average + (1 - t) * fb[path], atol=1e-5)


def test_model_stock_filter_wise_uses_one_ratio_per_row():
    rng = np.random.default_rng(0)
    row_cosines = [0.1, 0.4, 0.7, 0.95]
    w0 = rng.standard_normal((4, 32))
    offsets = [np.stack(rows) for rows in zip(*(stock_offsets(rng, 32, 3, c)
                                                for c in row_cosines))]
    base = {"w": w0.astype(np.float32)}
    models = [{"w": (w0 + d).astype(np.float32)} for d in offsets]
    average = w0 + sum(offsets) / 3
    rows = np.asarray(trees.merge("model_stock", models, base,
                                  parameters={"filter_wise": True})["w"], np.float64)
    ratios = ((rows - w0) * (average - w0)).sum(1) / ((average - w0) ** 2).sum(1)
    np.testing.assert_allclose(ratios, [stock_ratio(3, c) for c in row_cosines], atol=1e-5)
    whole = np.asarray(trees.merge("model_stock", models, base)["w"], np.float64)
    whole_ratio = ((whole - w0) * (average - w0)).sum() / ((average - w0) ** 2).sum()
    np.testing.assert_allclose(whole - w0, whole_ratio * (average - w0), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SLERP and NuSLERP
# ---------------------------------------------------------------------------------------------


def angle(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))


def test_slerp_endpoints_and_arc(family):
    base, (other, *_) = family
    assert_trees_close(trees.merge("slerp", [other], base, parameters={"t": 0.0}), base)
    assert_trees_close(trees.merge("slerp", [other], base, parameters={"t": 1.0}), other)

    rng = np.random.default_rng(1)
    v0, v1 = rng.standard_normal((2, 6, 10))
    v1 *= np.linalg.norm(v0) / np.linalg.norm(v1)  # equal norms
    theta = angle(v0, v1)
    merged = np.asarray(trees.merge("slerp", [{"w": v1.astype(np.float32)}],
                                    {"w": v0.astype(np.float32)},
                                    parameters={"t": 0.3})["w"], np.float64)
    np.testing.assert_allclose(np.linalg.norm(merged), np.linalg.norm(v0), rtol=1e-5)
    np.testing.assert_allclose(angle(v0, merged), 0.3 * theta, atol=1e-4)
    np.testing.assert_allclose(angle(merged, v1), 0.7 * theta, atol=1e-4)


@pytest.mark.parametrize("factor", [2.0, -1.0])
def test_slerp_of_nearly_collinear_tensors_is_linear(factor):
    rng = np.random.default_rng(2)
    v0 = rng.standard_normal((6, 10))
    v1 = factor * v0 + 1e-4 * rng.standard_normal((6, 10))
    merged = trees.merge("slerp", [{"w": v1.astype(np.float32)}], {"w": v0.astype(np.float32)},
                         parameters={"t": 0.25})["w"]
    np.testing.assert_allclose(merged, 0.75 * v0 + 0.25 * v1, atol=1e-5)


def test_nuslerp_weights_set_t_and_a_base_interpolates_task_vectors(family):
    base, (a, b, _) = family
    weights = [{"weight": 1.0}, {"weight": 3.0}]
    merged = trees.merge("nuslerp", [a, b], model_parameters=weights)
    assert_trees_close(merged, trees.merge("slerp", [b], a, parameters={"t": 0.75}))

    with_base = trees.merge("nuslerp", [a, b], base, model_parameters=weights)
    tau_a, tau_b = trees.task_vector(a, base), trees.task_vector(b, base)
    on_vectors = trees.merge("slerp", [tau_b], tau_a, parameters={"t": 0.75})
    assert_trees_close(with_base, tree.add(base, on_vectors))
    assert not np.allclose(floats(with_base)["head/kernel"], floats(merged)["head/kernel"],
                           atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Passthrough
# ---------------------------------------------------------------------------------------------


def test_passthrough_copies_one_model_optionally_scaled(family):
    _, (model, *_) = family
    assert_trees_close(trees.merge("passthrough", [model]), model)
    scaled = floats(trees.merge("passthrough", [model],
                                parameters={"scale": [(r"head/.*", 0.5)]}))
    for path, original in floats(model).items():
        factor = 0.5 if path.startswith("head/") else 1.0
        np.testing.assert_allclose(scaled[path], factor * original, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Per-path parameters: rules, gradients, per-model settings
# ---------------------------------------------------------------------------------------------


def lambdas(merged, base, tuned) -> dict[str, float]:
    """Each leaf's effective scale of ``tuned``'s task vector in ``merged``."""
    tau = delta(tuned, base)
    return {p: float((d * tau[p]).sum() / (tau[p] ** 2).sum())
            for p, d in delta(merged, base).items()}


def test_rules_first_match_wins(family):
    base, (tuned, *_) = family
    rules = [(r".*/attn/.*", 2.0), (r"encoder/.*", 0.5), (r".*", 1.0)]
    got = lambdas(trees.merge("task_arithmetic", [tuned], base,
                              parameters={"weight": 1.0, "lambda": rules}), base, tuned)
    for path, value in got.items():
        expected = 2.0 if "/attn/" in path else 0.5 if path.startswith("encoder/") else 1.0
        assert value == pytest.approx(expected, abs=1e-5), path
    swapped = lambdas(trees.merge("task_arithmetic", [tuned], base, parameters={
        "weight": 1.0, "lambda": [rules[1], rules[0], rules[2]]}), base, tuned)
    assert swapped["encoder/layer_0/attn/query/kernel"] == pytest.approx(0.5, abs=1e-5)


def test_a_rule_matching_no_path_is_a_one_line_error(family):
    base, (tuned, *_) = family
    with pytest.raises(ValueError) as err:
        trees.merge("task_arithmetic", [tuned], base, parameters={
            "weight": 1.0, "lambda": [(r"encoder/layer_0/atn/query/kernel", 2.0)]})
    message = str(err.value)
    assert "\n" not in message and "lambda" in message and "atn" in message
    assert "encoder/layer_0/attn/query/kernel" in message  # the closest path


def test_gradients_interpolate_over_layer_depth():
    rng = np.random.default_rng(3)
    base = make_tree(rng, layers=5)
    tuned = finetune(base, rng)

    def lambda_of(setting):
        merged = trees.merge("task_arithmetic", [tuned], base,
                             parameters={"weight": 1.0, "lambda": setting})
        return lambdas(merged, base, tuned)

    two = lambda_of([0.5, 2.5])
    three = lambda_of([1.0, 3.0, 2.0])
    for i, (linear, anchored) in enumerate(zip([0.5, 1.0, 1.5, 2.0, 2.5],
                                               [1.0, 2.0, 3.0, 2.5, 2.0])):
        for leaf in ("attn/query/kernel", "mlp/kernel", "mlp/bias"):
            assert two[f"encoder/layer_{i}/{leaf}"] == pytest.approx(linear, abs=1e-5)
            assert three[f"encoder/layer_{i}/{leaf}"] == pytest.approx(anchored, abs=1e-5)
    for path in ("embed/embedding", "head/kernel", "head/bias"):  # outside the layers
        assert two[path] == pytest.approx(0.5, abs=1e-5)
        assert three[path] == pytest.approx(1.0, abs=1e-5)

    ruled = lambda_of([(r"encoder/.*", [0.0, 1.0]), (r".*", 3.0)])
    assert ruled["encoder/layer_0/mlp/kernel"] == pytest.approx(0.0, abs=1e-5)
    assert ruled["encoder/layer_2/mlp/kernel"] == pytest.approx(0.5, abs=1e-5)
    assert ruled["encoder/layer_4/mlp/kernel"] == pytest.approx(1.0, abs=1e-5)
    assert ruled["head/kernel"] == pytest.approx(3.0, abs=1e-5)


def test_per_model_settings_override_shared_ones(family):
    base, (a, b, _) = family
    merged = delta(trees.merge("task_arithmetic", [a, b], base, parameters={"weight": 1.0},
                               model_parameters=[{"weight": 0.25}, {}]), base)
    tau_a, tau_b = delta(a, base), delta(b, base)
    for path, got in merged.items():
        np.testing.assert_allclose(got, 0.25 * tau_a[path] + tau_b[path], atol=1e-5)

    counts = delta(trees.merge("ties", [a], base, parameters={
        "weight": 1.0, "density": 0.5, "normalize": False},
        model_parameters=[{"density": 0.25}]), base)
    kernel = counts["encoder/layer_0/attn/query/kernel"]
    assert np.count_nonzero(kernel) == int(0.25 * kernel.size)

    # A per-model gradient: model a's weight rises over depth, model b's stays shared.
    graded = delta(trees.merge("task_arithmetic", [a, b], base, parameters={"weight": 1.0},
                               model_parameters=[{"weight": [0.0, 1.0]}, {}]), base)
    for i, w in enumerate([0.0, 0.5, 1.0]):
        path = f"encoder/layer_{i}/mlp/kernel"
        np.testing.assert_allclose(graded[path], w * tau_a[path] + tau_b[path], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def one_line_error(fn, *needles):
    with pytest.raises(ValueError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_bad_input_is_a_one_line_error(family):
    base, (a, b, _) = family
    one_line_error(lambda: trees.merge("soup", [a, b]), "soup", "linear", "ties", "slerp")
    one_line_error(lambda: trees.merge("ties", [a], base, parameters={"densty": 0.5}),
                   "densty", "density", "weight")
    one_line_error(lambda: trees.merge("linear", [a, b], model_parameters=[{"wieght": 1}, {}]),
                   "wieght", "weight")
    one_line_error(lambda: trees.merge("task_arithmetic", [a], base), "weight")
    one_line_error(lambda: trees.merge("task_arithmetic", [a, b], base,
                                       model_parameters=[{"weight": 1.0}, {}]),
                   "weight", "model 1")
    one_line_error(lambda: trees.merge("ties", [a], parameters={"weight": 1.0}), "base")
    one_line_error(lambda: trees.merge("slerp", [a, b], base, parameters={"t": 0.5}),
                   "exactly 1")
    one_line_error(lambda: trees.merge("linear", [a, b], parameters={"normalize": False},
                                       model_parameters=[{"weight": 0.5}, {"weight": 0.7}]),
                   "1.2", "not 1", "normalize")

    missing = tree.flatten(b)
    del missing["head/bias"]
    one_line_error(lambda: trees.merge("linear", [a, tree.unflatten(missing)],
                                       parameters={"weight": 1.0}), "head/bias")
    reshaped = {**tree.flatten(b), "head/kernel": np.zeros((D, 4), np.float32)}
    one_line_error(lambda: trees.merge("task_arithmetic", [a, tree.unflatten(reshaped)], base,
                                       parameters={"weight": 1.0}), "head/kernel", "(8, 4)")

    def poisoned(t, value):
        flat = tree.flatten(t)
        kernel = np.array(flat["encoder/layer_1/mlp/kernel"])
        kernel[2, 3] = value
        return tree.unflatten({**flat, "encoder/layer_1/mlp/kernel": kernel})

    for value in (np.nan, np.inf):
        one_line_error(lambda: trees.merge("ties", [a, poisoned(b, value)], base,
                                           parameters={"weight": 1.0}),
                       "model 1", "encoder/layer_1/mlp/kernel", "NaN or Inf")
        one_line_error(lambda: trees.merge("ties", [a, b], poisoned(base, value),
                                           parameters={"weight": 1.0}),
                       "the base model", "encoder/layer_1/mlp/kernel", "NaN or Inf")


# ---------------------------------------------------------------------------------------------
# Non-float leaves, dtypes, task vectors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {"weight": 1.0}), ("ties", {"weight": 1.0, "density": 0.5}),
    ("model_stock", {}), ("dare_linear", {"weight": 1.0, "density": 0.5})])
def test_non_float_leaves_are_copied_from_the_base(family, method, params):
    base, models = family
    merged = trees.merge(method, models[:2], base, parameters=params)
    ids = merged["embed"]["position_ids"]
    np.testing.assert_array_equal(ids, base["embed"]["position_ids"])
    assert np.asarray(ids).dtype == np.int32
    assert np.asarray(merged["head"]["kernel"]).dtype == np.float32


def test_non_float_leaves_without_a_base_come_from_the_first_model(family):
    _, (a, b, _) = family
    merged = trees.merge("linear", [a, b], parameters={"weight": 1.0})
    np.testing.assert_array_equal(merged["embed"]["position_ids"], a["embed"]["position_ids"])


def test_bfloat16_leaves_are_merged_in_their_dtype():
    base = {"w": jnp.zeros(4, jnp.bfloat16)}
    tuned = {"w": jnp.ones(4, jnp.bfloat16)}
    merged = trees.merge("task_arithmetic", [tuned], base, parameters={"weight": 0.5})["w"]
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(merged, np.float32), 0.5)


def test_nan_in_a_bfloat16_leaf_is_an_error():
    base = {"w": jnp.zeros(4, jnp.bfloat16)}
    tuned = {"w": jnp.array([1, np.nan, 1, 1], jnp.bfloat16)}
    with pytest.raises(ValueError, match="model 0 has NaN or Inf in w"):
        trees.merge("task_arithmetic", [tuned], base, parameters={"weight": 1.0})


def test_a_shared_parameter_given_per_model_is_an_error(family):
    base, (a, _, _) = family
    with pytest.raises(ValueError, match="model 0: task_arithmetic parameter 'lambda' is "
                                         "shared by all models; set it in parameters"):
        trees.merge("task_arithmetic", [a], base, parameters={"weight": 1.0},
                    model_parameters=[{"lambda": 5.0}])


def test_task_vectors_round_trip(family):
    base, (a, b, _) = family
    base, a, b = (without_integers(t) for t in (base, a, b))
    tau_a, tau_b = trees.task_vector(a, base), trees.task_vector(b, base)
    assert_trees_close(trees.apply_task_vectors(base, [tau_a]), a)
    assert_trees_close(trees.apply_task_vectors(trees.apply_task_vectors(base, [tau_a]),
                                                [tau_a], scale=-1.0), base)
    both = trees.apply_task_vectors(base, [tau_a, tau_b], scale=0.5)
    assert_trees_close(both, trees.merge("task_arithmetic", [a, b], base,
                                         parameters={"weight": 0.5}))


@pytest.mark.parametrize("values", ["distinct", "tied"])
def test_magnitude_trimming_keeps_exactly_k_on_large_tensors(values):
    """The linear-time selection (sample bracket, chunked pass) keeps exactly the k largest,
    ties at the threshold included, on tensors large enough to take that path."""
    rng = np.random.default_rng(0)
    n = 300_000
    delta = (rng.standard_normal(n) if values == "distinct"
             else rng.integers(-40, 41, n)).astype(np.float32)
    for density in (0.01, 0.3, 0.97):
        k = max(1, int(density * n))
        kept = sparsify.magnitude(delta.copy(), density) != 0
        assert kept.sum() == k  # integers in [-40, 40]: zeros are 1/81, fewer than n - k
        threshold = np.sort(np.abs(delta))[n - k]
        assert np.all(np.abs(delta[kept]) >= threshold)
        assert np.all(np.abs(delta[~kept & (delta != 0)]) <= threshold)
