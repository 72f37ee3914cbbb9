"""LoRA initialisations from the pretrained weight itself: PiSSA, OLoRA and CorDA.

Each function takes one kernel ``W`` and returns ``(A, B, W_residual)`` with
``W_residual + s·tensordot(A, B, 1) == W`` (float32 rounding aside): the adapter starts with a
chosen part of ``W`` and the frozen base keeps the rest, so the model's function is unchanged
at step 0.

Layout (shared with :mod:`research.lowrank.lora`): ``W`` has ``n_in`` leading input axes and the
rest are output axes (Dense ``[in, out]``; query ``[embed, heads, head_dim]``; attention out
``[heads, head_dim, embed]`` with ``n_in=2``; embedding ``[vocab, embed]``). ``A`` has W's input
axes plus the rank, ``B`` the rank plus W's output axes. Every method works on the 2-D view
``W.reshape(prod(inputs), prod(outputs))`` and reshapes back. This is the transpose of torch's
``nn.Linear.weight`` ``[out, in]``, so PEFT's ``lora_A.weight`` ``[r, in]`` is our ``A.T`` and
its ``lora_B.weight`` ``[out, r]`` our ``B.T``.

All functions are pure and jit-able (rank, ``n_in`` and mode are static); everything runs in
float32 with ``jnp.linalg``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
matmul = functools.partial(jnp.matmul, precision=HIGHEST)
CORDA_MODES = ("ipm", "kpm")


# ---------------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------------


def split_shape(shape, n_in: int) -> tuple[tuple, tuple]:
    """``(input axes, output axes)`` of a kernel shape; at least one of each."""
    shape = tuple(shape)
    if not 0 < n_in < len(shape):
        raise ValueError(f"kernel {shape} with {n_in} input axes leaves no input or output axis")
    return shape[:n_in], shape[n_in:]


def as_matrix(w, n_in: int = 1):
    """The float32 2-D view ``[prod(inputs), prod(outputs)]`` of a kernel."""
    ins, outs = split_shape(w.shape, n_in)
    return jnp.asarray(w, jnp.float32).reshape(math.prod(ins), math.prod(outs))


def to_factors(a2, b2, shape, n_in: int):
    """2-D factors ``[fan_in, r]``, ``[r, fan_out]`` -> the uniform layout for ``shape``."""
    ins, outs = split_shape(shape, n_in)
    r = a2.shape[-1]
    return a2.reshape(*ins, r), b2.reshape(r, *outs)


def check_rank(r: int, shape, n_in: int, what: str = "rank") -> None:
    ins, outs = split_shape(shape, n_in)
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    if not isinstance(r, int) or not 0 < r <= min(fan_in, fan_out):
        raise ValueError(f"{what} {r!r} must be an integer in [1, {min(fan_in, fan_out)}] for a "
                         f"kernel {tuple(shape)} ({fan_in} inputs x {fan_out} outputs)")


def _result(w, a2, b2, scale, n_in):
    """Factors in W's layout and the residual ``W - s·A·B`` in W's shape and dtype."""
    w2 = as_matrix(w, n_in)
    residual = w2 - scale * matmul(a2, b2)
    a, b = to_factors(a2, b2, w.shape, n_in)
    return a, b, residual.reshape(w.shape).astype(jnp.asarray(w).dtype)


# ---------------------------------------------------------------------------------------------
# SVD helpers
# ---------------------------------------------------------------------------------------------


def truncated_svd(m, r: int):
    """Top-``r`` ``(U [m, r], S [r], Vh [r, n])`` of a 2-D float32 matrix (exact SVD)."""
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def randomized_svd(m, r: int, *, niter: int = 4, oversample: int = 8, key=None):
    """Top-``r`` SVD by randomized subspace iteration (Halko, Martinsson & Tropp 2011), the
    counterpart of torch's ``svd_lowrank`` that PEFT uses for ``pissa_niter_{n}``: sketch the
    range with ``r + oversample`` Gaussian probes, refine with ``niter`` power iterations
    (re-orthonormalised by QR each half-step), then an exact SVD of the small projection."""
    rows, cols = m.shape
    q = min(r + oversample, rows, cols)
    key = jax.random.key(0) if key is None else key
    probes = jax.random.normal(key, (cols, q), jnp.float32)
    basis, _ = jnp.linalg.qr(matmul(m, probes))
    for _ in range(niter):
        basis, _ = jnp.linalg.qr(matmul(m.T, basis))
        basis, _ = jnp.linalg.qr(matmul(m, basis))
    u_small, s, vh = jnp.linalg.svd(matmul(basis.T, m), full_matrices=False)
    return matmul(basis, u_small)[:, :r], s[:r], vh[:r]


# ---------------------------------------------------------------------------------------------
# PiSSA
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("r", "n_in", "fast", "niter", "oversample"))
def pissa(w, r: int, scale=1.0, n_in: int = 1, *, fast: bool = False, niter: int = 4,
          oversample: int = 8, seed=0):
    """PiSSA (Meng, Wang & Zhang, 2024, "PiSSA: Principal Singular Values and Singular Vectors
    Adaptation of Large Language Models"): the adapter starts as W's top-``r`` singular
    components and the frozen residual keeps the rest.

    With ``W = U S Vᵀ``: ``A = U_r sqrt(S_r / s)``, ``B = sqrt(S_r / s) V_rᵀ`` (PEFT divides
    ``S_r`` by the scale so that ``s·A·B`` is exactly the rank-r truncation), and
    ``W_res = W - s·A·B``. ``fast=True`` replaces the exact SVD by :func:`randomized_svd`
    (PEFT's ``pissa_niter_{niter}``) seeded by ``seed``; the residual still makes
    ``W_res + s·A·B == W`` exactly.
    """
    check_rank(r, w.shape, n_in, "PiSSA rank")
    w2 = as_matrix(w, n_in)
    if fast:
        key = jax.random.key(seed)
        u, s, vh = randomized_svd(w2, r, niter=niter, oversample=oversample, key=key)
    else:
        u, s, vh = truncated_svd(w2, r)
    root = jnp.sqrt(s / scale)
    return _result(w, u * root, root[:, None] * vh, scale, n_in)


# ---------------------------------------------------------------------------------------------
# OLoRA
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("r", "n_in"))
def olora(w, r: int, scale=1.0, n_in: int = 1):
    """OLoRA (Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language
    Models"): start the adapter from a QR decomposition of W, with an orthonormal factor.

    PEFT's recipe on the torch weight ``W_t = Wᵀ`` ``[out, in]``: ``Q, R = qr(W_t)`` (reduced),
    ``lora_B = Q[:, :r]`` (orthonormal columns), ``lora_A = R[:r]``, base ``W_t - s·Q_r R_r``.
    In our layout ``A = R_rᵀ`` ``[in, r]`` and ``B = Q_rᵀ`` ``[r, out]`` (orthonormal rows), and
    ``W_res = W - s·A·B``. ``Q_r R_r = Q_r Q_rᵀ W_t`` projects W onto the span of the first ``r``
    input columns of ``W_t``. As in PEFT the factors are not divided by the scale, so with
    ``s != 1`` the residual is ``W - s·(that projection)``; the identity at init still holds.
    """
    check_rank(r, w.shape, n_in, "OLoRA rank")
    w2 = as_matrix(w, n_in)
    q, rr = jnp.linalg.qr(w2.T)          # torch layout [out, in]: q [out, k], rr [k, in]
    return _result(w, rr[:r].T, q[:, :r].T, scale, n_in)


# ---------------------------------------------------------------------------------------------
# CorDA
# ---------------------------------------------------------------------------------------------


class CovarianceState(NamedTuple):
    """Running ``sum xᵀx`` and sample count over batches of a layer's inputs (a pytree)."""
    xtx: jax.Array
    count: jax.Array

    def covariance(self):
        return self.xtx / jnp.maximum(self.count, 1).astype(jnp.float32)


def _samples(inputs, n_in: int):
    x = jnp.asarray(inputs, jnp.float32)
    if x.ndim < n_in:
        raise ValueError(f"layer inputs {x.shape} have fewer than {n_in} feature axes")
    features = math.prod(x.shape[x.ndim - n_in:])
    return x.reshape(-1, features)


def covariance(inputs, n_in: int = 1):
    """``C = XᵀX / n`` (uncentred second moment, as CorDA) of a batch of layer inputs
    ``[..., in]``: the leading axes are samples, the last ``n_in`` axes the features (so an
    attention output projection's inputs ``[..., heads, head_dim]`` use ``n_in=2``)."""
    x = _samples(inputs, n_in)
    return matmul(x.T, x) / max(x.shape[0], 1)


def accumulate_covariance(state: CovarianceState | None, inputs, n_in: int = 1):
    """Add a batch of layer inputs to a running :class:`CovarianceState` (``None`` starts
    one); ``state.covariance()`` is then the covariance over every sample seen. Jit-able with
    a state (the first call, with ``None``, only builds the state)."""
    x = _samples(inputs, n_in)
    xtx, count = matmul(x.T, x), jnp.asarray(x.shape[0], jnp.int32)
    if state is None:
        return CovarianceState(xtx, count)
    if state.xtx.shape != xtx.shape:
        raise ValueError(f"covariance state is {state.xtx.shape}; these inputs give {xtx.shape}")
    return CovarianceState(state.xtx + xtx, state.count + count)


def damped_inverse(c, damp=0.01, *, tolerance: float = 0.05, max_doublings: int = 30):
    """``(C + λI, (C + λI)⁻¹)`` with ``λ = damp·mean(diag C)``. As in CorDA's code (and
    PEFT's port), ``damp`` doubles until ``||(C + λI)(C + λI)⁻¹ - I||_F < tolerance`` (at most
    ``max_doublings`` times; ``damp=0`` means no damping and no doubling)."""
    c = jnp.asarray(c, jnp.float32)
    eye = jnp.eye(c.shape[0], dtype=jnp.float32)
    level = jnp.mean(jnp.diag(c))

    def fix(d):
        fixed = c + d * level * eye
        return fixed, jnp.linalg.inv(fixed)

    def error(d):
        fixed, inv = fix(d)
        return jnp.linalg.norm(matmul(fixed, inv) - eye)

    def cond(carry):
        d, steps = carry
        bad = jnp.logical_not(error(d) < tolerance)   # NaN counts as bad
        return bad & (d > 0) & (steps < max_doublings)

    d0 = jnp.asarray(damp, jnp.float32)
    d, _ = jax.lax.while_loop(cond, lambda carry: (carry[0] * 2, carry[1] + 1), (d0, 0))
    return fix(d)


@functools.partial(jax.jit, static_argnames=("r", "n_in", "mode", "max_doublings"))
def corda(w, c, r: int, scale=1.0, n_in: int = 1, mode: str = "ipm", *, damp=0.01,
          max_doublings: int = 30):
    """CorDA (Yang et al., 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large
    Language Models"): SVD of the weight times the covariance of its inputs, so the split into
    adapter and frozen base is oriented by the data the layer sees.

    The paper (and PEFT's port) works on the torch weight ``W_t = Wᵀ`` ``[out, in]`` with
    ``C = E[x xᵀ]`` ``[in, in]``: ``U S Vhᵀ = svd(W_t C)``, then ``V = (Vh C⁻¹)ᵀ`` so that
    ``W_t = U S Vᵀ`` exactly. In our ``[in, out]`` layout ``(W_t C)ᵀ = Cᵀ W = C W`` (C symmetric),
    so we take ``P Σ Qᵀ = svd(C W)`` and map back with ``C⁻¹``: ``W = Σ_i σ_i (C⁻¹ p_i) q_iᵀ``.

    mode 'ipm' (instruction-previewed: C from the task's data) gives the adapter the ``r``
    largest components; 'kpm' (knowledge-preserving: C from data whose knowledge should stay,
    e.g. QA) the ``r`` smallest, so the components that matter most on that data stay frozen.
    ``A = C⁻¹ P_r sqrt(Σ_r / s)``, ``B = sqrt(Σ_r / s) Q_rᵀ``, ``W_res = W - s·A·B``.

    ``c``: ``[prod(inputs), prod(inputs)]`` (see :func:`covariance`). It is damped by
    ``damp·mean(diag C)`` on the diagonal before use (see :func:`damped_inverse`).
    """
    if mode not in CORDA_MODES:
        raise ValueError(f"CorDA mode {mode!r} is not one of {CORDA_MODES}")
    check_rank(r, w.shape, n_in, "CorDA rank")
    w2 = as_matrix(w, n_in)
    if tuple(c.shape) != (w2.shape[0],) * 2:
        raise ValueError(f"CorDA covariance {tuple(c.shape)} does not match kernel {w.shape}: "
                         f"it needs ({w2.shape[0]}, {w2.shape[0]}) for {n_in} input axes")
    fixed, inv = damped_inverse(c, damp, max_doublings=max_doublings)
    p, s, qh = jnp.linalg.svd(matmul(fixed, w2), full_matrices=False)
    pick = slice(None, r) if mode == "ipm" else slice(s.shape[0] - r, None)
    p, s, qh = p[:, pick], s[pick], qh[pick]
    root = jnp.sqrt(s / scale)
    return _result(w, matmul(inv, p) * root, root[:, None] * qh, scale, n_in)
