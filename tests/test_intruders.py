"""Intruder dimensions: detection, per-tree counts and the singular-value mitigation."""

import numpy as np
import pytest

from research.analysis import intruders

FAN_IN, FAN_OUT, TOP = 24, 32, 10


def base_and_intruded(sigma=50.0, seed=0):
    """W0 [in, out] with a well-separated spectrum, and W = W0 + σ·a bᵀ where a and b lie in
    the spans of W0's bottom input / output singular vectors (orthogonal to its top ones)."""
    g = np.random.default_rng(seed)
    u0, _ = np.linalg.qr(g.normal(size=(FAN_IN, FAN_IN)))
    v0, _ = np.linalg.qr(g.normal(size=(FAN_OUT, FAN_IN)))
    s0 = np.linspace(10.0, 1.0, FAN_IN)
    w0 = (u0 * s0) @ v0.T
    signs = lambda n: g.choice([-1.0, 1.0], size=n) / np.sqrt(n)  # noqa: E731
    a = u0[:, TOP:] @ signs(FAN_IN - TOP)
    b = v0[:, TOP:] @ signs(FAN_IN - TOP)
    w = w0 + sigma * np.outer(a, b)
    return w0.astype(np.float32), w.astype(np.float32)


def test_a_matrix_has_no_intruders_against_itself():
    w0, _ = base_and_intruded()
    indices, sims = intruders.intruder_dimensions(w0, w0, k=TOP)
    assert indices.size == 0
    np.testing.assert_allclose(sims, 1.0, atol=1e-5)


def test_small_dense_update_has_no_intruders():
    w0, _ = base_and_intruded()
    w = w0 + 0.01 * np.random.default_rng(1).normal(size=w0.shape).astype(np.float32)
    assert intruders.intruder_dimensions(w0, w, k=TOP)[0].size == 0


@pytest.mark.parametrize("side", ["output", "input"])
def test_an_orthogonal_large_rank_one_update_is_exactly_one_intruder(side):
    w0, w = base_and_intruded()
    indices, sims = intruders.intruder_dimensions(w0, w, k=TOP, epsilon=0.5, side=side)
    np.testing.assert_array_equal(indices, [0])    # the new top singular vector
    assert sims.shape == (TOP,) and float(sims[0]) < 0.5
    np.testing.assert_allclose(sims[1:], 1.0, atol=1e-4)   # W0's top vectors are untouched
    # a threshold below the intruder's similarity finds none
    assert intruders.intruder_dimensions(w0, w, TOP, float(sims[0]) - 1e-3, side=side)[0].size == 0


def test_multi_axis_kernels_use_the_2d_view():
    w0, w = base_and_intruded()
    w0_3, w_3 = w0.reshape(4, 6, FAN_OUT), w.reshape(4, 6, FAN_OUT)   # attention out, n_in=2
    np.testing.assert_array_equal(intruders.intruder_dimensions(w0_3, w_3, TOP, n_in=2)[0], [0])
    np.testing.assert_allclose(intruders.max_similarities(w0_3, w_3, TOP, n_in=2),
                               intruders.max_similarities(w0, w, TOP), atol=1e-5)


def test_scale_intruders_factor_one_is_identity_and_zero_removes_the_component():
    w0, w = base_and_intruded()
    np.testing.assert_allclose(intruders.scale_intruders(w0, w, 1.0, TOP), w, atol=1e-5)
    u, s, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    top = s[0] * np.outer(u[:, 0], vh[0])
    removed = np.asarray(intruders.scale_intruders(w0, w, 0.0, TOP))
    np.testing.assert_allclose(removed, w - top, atol=1e-4)
    assert intruders.intruder_dimensions(w0, removed, TOP)[0].size == 0
    halved = np.asarray(intruders.scale_intruders(w0, w, 0.5, TOP))
    np.testing.assert_allclose(halved, w - 0.5 * top, atol=1e-4)
    # no intruders: any factor leaves W alone
    np.testing.assert_allclose(intruders.scale_intruders(w0, w0, 0.0, TOP), w0, atol=1e-5)


def test_count_intruders_over_a_tree():
    w0, w = base_and_intruded()
    other = np.random.default_rng(2).normal(size=(16, 8)).astype(np.float32)
    base = {"layer_0": {"attn": {"query": {"kernel": w0}, "out": {"kernel": w0.reshape(4, 6, 32)}},
                        "mlp": {"kernel": other, "bias": np.zeros(8, np.float32)}}}
    tuned = {"layer_0": {"attn": {"query": {"kernel": w}, "out": {"kernel": w.reshape(4, 6, 32)}},
                         "mlp": {"kernel": other, "bias": np.ones(8, np.float32)}}}
    report = intruders.count_intruders(base, tuned, [(r".*mlp/kernel", False), (r".*kernel", True)],
                                       k=TOP)
    assert report["per_path"] == {"layer_0/attn/query/kernel": 1, "layer_0/attn/out/kernel": 1}
    assert report["total"] == 2 and report["matrices"] == 2 and report["with_intruders"] == 2
    same = intruders.count_intruders(base, base, [(r".*kernel", True)], k=TOP)
    assert same["total"] == 0 and same["matrices"] == 3


def test_errors():
    w0, w = base_and_intruded()
    with pytest.raises(ValueError, match="differ in shape"):
        intruders.intruder_dimensions(w0, w[:, :5])
    with pytest.raises(ValueError, match="side 'left'"):
        intruders.intruder_dimensions(w0, w, side="left")
    params = {"layer_0": {"dense": {"kernel": w0}}}
    with pytest.raises(ValueError, match=r"intruder rule '.*dens/kernel' matches no parameter; "
                                         r"closest: layer_0/dense/kernel"):
        intruders.count_intruders(params, params, [(r".*dens/kernel", True)])
