"""Intruder dimensions (Shuttleworth, Andreas, Torralba & Sharma, 2024, "LoRA vs Full
Fine-tuning: An Illusion of Equivalence"): high-ranking singular vectors of a fine-tuned weight
that resemble none of the pretrained weight's singular vectors.

For one matrix: SVD both ``W0`` and ``W``; for each of ``W``'s top-``k`` singular vectors take
its largest ``|cosine|`` with *all* of ``W0``'s singular vectors on the same side; it is an
intruder when that maximum is below ``epsilon``. The paper's code (github.com/reeceshuttle/
intruder-dimensions, ``find_intruder_dimensions.py``) compares the left singular vectors ``U``
of the torch weight ``[out, in]``, i.e. output-space directions, with ``k = 10`` and threshold
0.5 by default; in our ``[in, out]`` layout those are the right singular vectors, hence the
default ``side='output'`` (``'input'`` compares the input-space vectors instead).

Mitigation (the paper's causal intervention, PEFT's ``reduce_intruder_dimension``): scale the
singular values of the intruders, ``W + (λ - 1)·Σ_{i∈intruders} σ_i u_i v_iᵀ``, computed on the
fine-tuned matrix itself; :func:`scale_intruders` does exactly that and nothing else.

Kernel layout as everywhere (``n_in`` leading input axes, the 2-D view ``[fan_in, fan_out]``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from research import tree
from research.lowrank.extract import TARGET_LEAVES, default_input_axes
from research.lowrank.init import matmul, as_matrix

SIDES = ("output", "input")


def _check(w0, w, side):
    if tuple(w0.shape) != tuple(w.shape):
        raise ValueError(f"pretrained {tuple(w0.shape)} and fine-tuned {tuple(w.shape)} "
                         f"matrices differ in shape")
    if side not in SIDES:
        raise ValueError(f"side {side!r} is not one of {SIDES}")


def _vectors(u, vh, side):
    """Singular vectors of one side as rows, ordered by singular value."""
    return vh if side == "output" else u.T


def _max_similarities_2d(w0, w, k: int, side: str):
    u0, _, vh0 = jnp.linalg.svd(w0, full_matrices=False)
    u, _, vh = jnp.linalg.svd(w, full_matrices=False)
    base, tuned = _vectors(u0, vh0, side), _vectors(u, vh, side)[:k]
    return jnp.max(jnp.abs(matmul(tuned, base.T)), axis=1)


@functools.partial(jax.jit, static_argnames=("k", "n_in", "side"))
def max_similarities(w0, w, k: int = 10, n_in: int = 1, side: str = "output"):
    """``[min(k, rank)]``: for each of ``W``'s top singular vectors, its largest ``|cos|`` with
    any of ``W0``'s singular vectors (same side). Pure and jit-able; the 2-D core vmaps over
    stacked layers of equal shape."""
    _check(w0, w, side)
    w0_2, w_2 = as_matrix(w0, n_in), as_matrix(w, n_in)
    return _max_similarities_2d(w0_2, w_2, min(k, *w_2.shape), side)


def intruder_dimensions(w0, w, k: int = 10, epsilon: float = 0.5, n_in: int = 1,
                        side: str = "output"):
    """``(indices, similarities)``: positions among ``W``'s top-``k`` singular vectors whose
    maximum ``|cos|`` to ``W0``'s singular vectors is below ``epsilon`` (numpy int array), and
    those maxima for all top-``k`` vectors."""
    sims = max_similarities(w0, w, k, n_in, side)
    return np.flatnonzero(np.asarray(sims) < epsilon), sims


@functools.partial(jax.jit, static_argnames=("k", "n_in", "side"))
def scale_intruders(w0, w, factor, k: int = 10, epsilon=0.5, n_in: int = 1,
                    side: str = "output"):
    """``W`` with the singular values of its intruder dimensions multiplied by ``factor``
    (1: unchanged; 0: removed), every other singular component left as it is."""
    _check(w0, w, side)
    w0_2, w_2 = as_matrix(w0, n_in), as_matrix(w, n_in)
    k = min(k, *w_2.shape)
    u0, _, vh0 = jnp.linalg.svd(w0_2, full_matrices=False)
    u, s, vh = jnp.linalg.svd(w_2, full_matrices=False)
    base, tuned = _vectors(u0, vh0, side), _vectors(u, vh, side)[:k]
    sims = jnp.max(jnp.abs(matmul(tuned, base.T)), axis=1)
    weight = jnp.where(sims < epsilon, s[:k], 0.0) * (jnp.asarray(factor, jnp.float32) - 1.0)
    update = matmul(u[:, :k] * weight, vh[:k])
    return (w_2 + update).reshape(w.shape).astype(jnp.asarray(w).dtype)


def count_intruders(base_params, tuned_params, rules, k: int = 10, epsilon: float = 0.5, *,
                    side: str = "output",
                    input_axes: Callable[[str, tuple], int] = default_input_axes) -> dict:
    """Intruder counts over the kernels (and embedding tables) that ``rules`` select.

    rules: ordered ``(regex, flag)`` rules over kernel/embedding paths, first match wins; a
        falsy flag excludes the path. A rule that matches nothing is a one-line error.
    Returns ``{"per_path": {path: count}, "similarities": {path: array [k]}, "total": int,
    "matrices": int, "with_intruders": int}``.
    """
    flat_base, flat_tuned = tree.flatten(base_params), tree.flatten(tuned_params)
    candidates = [p for p in flat_base if p.rpartition(tree.SEP)[2] in TARGET_LEAVES]
    chosen = tree.resolve_rules(list(rules), candidates, what="intruder rule")
    per_path, sims_by_path = {}, {}
    for path in candidates:
        if not chosen[path]:
            continue
        if path not in flat_tuned:
            near = ", ".join(tree.closest_paths(path, flat_tuned))
            raise ValueError(f"intruders: {path!r} is not in the tuned model; closest: {near}")
        w0, w = flat_base[path], flat_tuned[path]
        n_in = 1 if path.endswith("embedding") else int(input_axes(path, tuple(w0.shape)))
        indices, sims = intruder_dimensions(w0, w, k, epsilon, n_in, side)
        per_path[path] = int(indices.size)
        sims_by_path[path] = np.asarray(sims)
    return {"per_path": per_path, "similarities": sims_by_path,
            "total": sum(per_path.values()), "matrices": len(per_path),
            "with_intruders": sum(1 for c in per_path.values() if c)}
