"""PiSSA, OLoRA and CorDA initialisations, layer-input covariances, and LoRA extraction."""

import numpy as np
import pytest

import jax.numpy as jnp

from research import tree
from research.lowrank import extract as ex
from research.lowrank import init

ATOL = 1e-5


def rng(seed=0):
    return np.random.default_rng(seed)


def product(a, b, scale=1.0):
    return scale * np.tensordot(np.asarray(a, np.float64), np.asarray(b, np.float64), 1)


def matrix(w, n_in):
    w = np.asarray(w, np.float64)
    return w.reshape(int(np.prod(w.shape[:n_in])), -1)


def truncation(m, r, bottom=False):
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    pick = slice(len(s) - r, None) if bottom else slice(None, r)
    return (u[:, pick] * s[pick]) @ vh[pick]


# shapes: Dense [in, out], query [embed, heads, head_dim], attention out [heads, head_dim, embed]
LAYOUTS = [((12, 20), 1), ((16, 2, 4), 1), ((2, 4, 10), 2)]


# ---------------------------------------------------------------------------------------------
# PiSSA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,n_in", LAYOUTS)
def test_pissa_reconstructs_and_takes_the_top_singular_components(shape, n_in):
    w = rng(1).normal(size=shape).astype(np.float32)
    r, s = 3, 2.5
    a, b, res = init.pissa(w, r, s, n_in)
    assert a.shape == (*shape[:n_in], r) and b.shape == (r, *shape[n_in:])
    assert res.shape == shape and res.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(res) + product(a, b, s), w, atol=ATOL)
    np.testing.assert_allclose(matrix(product(a, b, s), n_in), truncation(matrix(w, n_in), r),
                               atol=1e-4)
    # A and B carry sqrt(S/s) each: equal column / row norms
    np.testing.assert_allclose(np.linalg.norm(matrix(a, n_in), axis=0),
                               np.linalg.norm(np.asarray(b).reshape(r, -1), axis=1), rtol=1e-4)


def test_pissa_fast_matches_exact_on_a_low_rank_plus_noise_matrix():
    g = rng(2)
    w = (g.normal(size=(40, 3)) * [9, 6, 4]) @ g.normal(size=(3, 30))
    w = w + 0.01 * g.normal(size=(40, 30))
    w = w.astype(np.float32)
    a, b, res = init.pissa(w, 3, 1.0, fast=True, niter=2, seed=7)
    np.testing.assert_allclose(np.asarray(res) + product(a, b), w, atol=ATOL)
    np.testing.assert_allclose(product(a, b), truncation(w.astype(np.float64), 3), atol=2e-3)


# ---------------------------------------------------------------------------------------------
# OLoRA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,n_in", LAYOUTS)
def test_olora_reconstructs_with_orthonormal_b_and_projects_onto_first_columns(shape, n_in):
    w = rng(3).normal(size=shape).astype(np.float32)
    r, s = 3, 0.5
    a, b, res = init.olora(w, r, s, n_in)
    np.testing.assert_allclose(np.asarray(res) + product(a, b, s), w, atol=ATOL)
    b2 = np.asarray(b, np.float64).reshape(r, -1)
    np.testing.assert_allclose(b2 @ b2.T, np.eye(r), atol=1e-5)   # PEFT's lora_B = Q_r
    # torch layout W_t = W2ᵀ: Q_r R_r = Q_r Q_rᵀ W_t, Q_r spanning W_t's first r columns
    w_t = matrix(w, n_in).T
    q, _ = np.linalg.qr(w_t[:, :r])
    np.testing.assert_allclose(matrix(product(a, b), n_in).T, q @ q.T @ w_t, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# CorDA
# ---------------------------------------------------------------------------------------------


def constructed_covariance(n, seed=4, low=1.0, high=10.0):
    q, _ = np.linalg.qr(rng(seed).normal(size=(n, n)))
    return ((q * np.linspace(high, low, n)) @ q.T).astype(np.float32)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("shape,n_in", LAYOUTS)
def test_corda_reconstructs(shape, n_in, mode):
    w = rng(5).normal(size=shape).astype(np.float32)
    c = constructed_covariance(int(np.prod(shape[:n_in])))
    a, b, res = init.corda(w, c, 3, 2.0, n_in, mode)
    assert a.shape == (*shape[:n_in], 3) and b.shape == (3, *shape[n_in:])
    np.testing.assert_allclose(np.asarray(res) + product(a, b, 2.0), w, atol=ATOL)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_adapter_holds_the_largest_or_smallest_components_of_cw(mode):
    w = rng(6).normal(size=(10, 14)).astype(np.float32)
    c = constructed_covariance(10)
    damp, r, s = 0.01, 3, 4.0
    a, b, _ = init.corda(w, c, r, s, 1, mode, damp=damp)
    fixed = c.astype(np.float64) + damp * np.mean(np.diag(c)) * np.eye(10)
    cw = fixed @ w
    # C·(s·A·B) is the top-r ('ipm') or bottom-r ('kpm') part of svd(C·W)
    np.testing.assert_allclose(fixed @ product(a, b, s), truncation(cw, r, mode == "kpm"),
                               atol=1e-3)
    other = truncation(cw, r, mode != "kpm")
    assert np.linalg.norm(fixed @ product(a, b, s) - other) > 1.0


def test_corda_kpm_changes_layer_outputs_less_than_ipm():
    g = rng(7)
    n_in_features, out, r = 16, 12, 4
    basis, _ = np.linalg.qr(g.normal(size=(n_in_features, n_in_features)))
    x = (g.normal(size=(2048, n_in_features)) * np.geomspace(5.0, 0.1, n_in_features)) @ basis.T
    x = x.astype(np.float32)
    w = g.normal(size=(n_in_features, out)).astype(np.float32)
    c = init.covariance(x)
    change = {}
    for mode in ("kpm", "ipm"):
        _, _, res = init.corda(w, c, r, 1.0, 1, mode)
        change[mode] = np.linalg.norm(x @ np.asarray(res) - x @ w)
    # and PiSSA (the top components of W itself, data-blind) sits in between here
    _, _, res = init.pissa(w, r)
    pissa_change = np.linalg.norm(x @ np.asarray(res) - x @ w)
    assert change["kpm"] < pissa_change < change["ipm"]
    assert change["kpm"] < 0.1 * change["ipm"]


def test_covariance_and_streaming_accumulation_agree():
    x = rng(8).normal(size=(3, 5, 6)).astype(np.float32)
    flat = x.reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(init.covariance(x), flat.T @ flat / 15, atol=1e-5)
    state = None
    for batch in x:
        state = init.accumulate_covariance(state, batch)
    assert int(state.count) == 15
    np.testing.assert_allclose(state.covariance(), init.covariance(x), atol=1e-5)
    # attention-out inputs [..., heads, head_dim] flatten their last two axes
    heads = x.reshape(3, 5, 2, 3)
    np.testing.assert_allclose(init.covariance(heads, n_in=2), init.covariance(x), atol=1e-6)


def test_damping_keeps_a_singular_covariance_invertible():
    x = rng(9).normal(size=(4, 8)).astype(np.float32)   # rank 4 < 8
    w = rng(10).normal(size=(8, 6)).astype(np.float32)
    a, b, res = init.corda(w, init.covariance(x), 2, 1.0, 1, "kpm")
    assert np.all(np.isfinite(np.asarray(a))) and np.all(np.isfinite(np.asarray(b)))
    np.testing.assert_allclose(np.asarray(res) + product(a, b), w, atol=1e-4)


def test_init_errors_are_one_line():
    w = np.zeros((6, 4), np.float32)
    for fn in (lambda: init.pissa(w, 5), lambda: init.olora(w, 0),
               lambda: init.corda(w, np.eye(6, dtype=np.float32), 7)):
        with pytest.raises(ValueError, match=r"rank .* \(6 inputs x 4 outputs\)"):
            fn()
    with pytest.raises(ValueError, match="mode 'xyz'"):
        init.corda(w, np.eye(6, dtype=np.float32), 2, mode="xyz")
    with pytest.raises(ValueError, match=r"covariance \(4, 4\) does not match"):
        init.corda(w, np.eye(4, dtype=np.float32), 2)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def small_model(seed=11):
    g = rng(seed)
    f = lambda *shape: g.normal(size=shape).astype(np.float32)  # noqa: E731
    return {
        "embed": {"word": {"embedding": f(10, 8)}},
        "encoder": {"layer_0": {
            "attn": {"query": {"kernel": f(8, 2, 4), "bias": f(2, 4)},
                     "out": {"kernel": f(2, 4, 8), "bias": f(8)}},
            "mlp": {"fc1": {"kernel": f(8, 16), "bias": f(16)}},
        }},
    }


def low_rank_delta(shape, n_in, r, seed):
    g = rng(seed)
    fan_in = int(np.prod(shape[:n_in]))
    return ((g.normal(size=(fan_in, r)) @ g.normal(size=(r, int(np.prod(shape)) // fan_in)))
            .reshape(shape).astype(np.float32))


def test_extracting_an_exactly_low_rank_delta_reproduces_it():
    base = small_model()
    flat = dict(tree.flatten(base))
    targets = {"encoder/layer_0/attn/query/kernel": (1, 2),
               "encoder/layer_0/attn/out/kernel": (2, 3),
               "embed/word/embedding": (1, 2)}
    deltas = {p: low_rank_delta(flat[p].shape, n_in, r, i) for i, (p, (n_in, r))
              in enumerate(targets.items())}
    tuned = tree.unflatten({p: v + deltas.get(p, 0) for p, v in flat.items()})
    factors, report = ex.extract(base, tuned, [(r".*attn/(query|out)/kernel", 2),
                                               (r".*attn/out/kernel", 3),  # shadowed
                                               (r".*embedding", 2)])
    # first match wins: attn/out gets rank 2 although its delta has rank 3
    flat_f = tree.flatten(factors)
    assert set(flat_f) == {"encoder/layer_0/attn/query/lora_a", "encoder/layer_0/attn/query/lora_b",
                           "encoder/layer_0/attn/out/lora_a", "encoder/layer_0/attn/out/lora_b",
                           "embed/word/lora_a", "embed/word/lora_b"}
    assert flat_f["encoder/layer_0/attn/out/lora_a"].shape == (2, 4, 2)
    assert flat_f["encoder/layer_0/attn/out/lora_b"].shape == (2, 8)
    assert flat_f["embed/word/lora_a"].shape == (10, 2)
    for path in ("encoder/layer_0/attn/query/kernel", "embed/word/embedding"):
        parent = path.rpartition("/")[0]
        rebuilt = product(flat_f[f"{parent}/lora_a"], flat_f[f"{parent}/lora_b"])
        np.testing.assert_allclose(rebuilt, deltas[path], atol=1e-4)
        assert report[path]["rank"] == 2 and report[path]["error"] < 1e-5
        assert report[path]["energy"] == pytest.approx(1.0, abs=1e-5)
    out = report["encoder/layer_0/attn/out/kernel"]
    assert out["rank"] == 2 and out["error"] > 1e-3 and out["energy"] < 1.0


def test_extraction_error_falls_and_energy_rises_with_rank():
    base = small_model()
    noise = {p: v + 0.1 * rng(12).normal(size=v.shape).astype(np.float32)
             for p, v in tree.flatten(base).items()}
    tuned = tree.unflatten(noise)
    path = "encoder/layer_0/mlp/fc1/kernel"
    errors, energies = [], []
    for r in range(1, 9):
        _, report = ex.extract(base, tuned, [(r".*fc1/kernel", r)])
        errors.append(report[path]["error"])
        energies.append(report[path]["energy"])
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:]))
    assert all(k1 < k2 for k1, k2 in zip(energies, energies[1:]))
    assert errors[-1] < 1e-5 and energies[-1] == pytest.approx(1.0, abs=1e-6)
    # relative error² + energy kept = 1 (Eckart–Young)
    np.testing.assert_allclose(np.square(errors) + np.asarray(energies), 1.0, atol=1e-4)


def test_extraction_errors_are_one_line():
    base = small_model()
    with pytest.raises(ValueError, match=r"rank 9 for encoder/layer_0/attn/out/kernel .*"
                                         r"\(2, 4, 8\) is 8 \(inputs \(2, 4\)\) x 8"):
        ex.extract(base, base, [(r".*attn/out/kernel", 9)])
    with pytest.raises(ValueError, match=r"LoRA extraction rule '.*atn/query.*' matches no "
                                         r"parameter; closest: "):
        ex.extract(base, base, [(r".*atn/query/kernel", 2)])
    with pytest.raises(ValueError, match="matches no parameter"):   # biases are not targets
        ex.extract(base, base, [(r".*fc1/bias", 2)])
    bigger = tree.unflatten({**tree.flatten(base), "encoder/layer_0/mlp/fc1/kernel":
                             np.zeros((8, 17), np.float32)})
    with pytest.raises(ValueError, match=r"fc1/kernel is \(8, 16\) in the base model and "
                                         r"\(8, 17\) in the tuned"):
        ex.extract(base, bigger, [(r".*fc1/kernel", 2)])
