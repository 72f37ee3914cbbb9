"""Sparsifying a task vector, and the whole-tensor statistics every merge reads.

The trimming steps of mergekit's generalized task arithmetic (Goddard et al. 2024, "Arcee's
MergeKit"): TIES keeps the largest entries by magnitude (Yadav et al. 2023), breadcrumbs drops
the largest outliers and the smallest (Davari & Belilovsky 2024), DARE drops at random and
rescales (Yu et al. 2024), DELLA drops at random with a keep probability rising with the
magnitude rank in the row (Deep et al. 2024). Each works in place on a task vector the caller
owns and multiplies the survivors by the model's weight (``scale``).

Whole-tensor statistics (sums, the k-th smallest value, ties at it) go through a
:class:`Whole` object, so the same code merges one piece of a sharded tensor when given the
cross-process version (:class:`research.merge.sharded.Distributed`). Selection is linear time
(a partition, or a sample-bracketed pass) where mergekit sorts, and keeps exactly k entries:
ties at the threshold are taken in index order, as a stable sort would.
"""

from __future__ import annotations

import numpy as np

from research.sites import chunks, kth_largest_magnitude


# ---------------------------------------------------------------------------------------------
# Whole-tensor statistics
# ---------------------------------------------------------------------------------------------


class Whole:
    """Statistics of a tensor held whole by this process. A sharded merge passes its own
    object with the same methods, computing them across the processes that hold the pieces
    (:mod:`research.merge.sharded`); every method here reads whole-tensor statistics only
    through it."""

    def total(self, value):
        """The sum over all pieces of a per-piece partial sum (here: the value itself)."""
        return value

    def kth_smallest(self, values: np.ndarray, k: int):
        """The ``k``-th smallest (1-based) of the whole tensor's ``values``, which it may
        reorder (a partition in place)."""
        values.partition(k - 1)
        return values[k - 1]

    def equal_before(self, count: int) -> int:
        """How many entries equal to the threshold earlier pieces hold (ties are taken in
        piece order)."""
        return 0


WHOLE = Whole()


def norm(x: np.ndarray, stats: Whole):
    flat = x.ravel()
    return np.sqrt(stats.total(np.dot(flat, flat)))


def dot(a: np.ndarray, b: np.ndarray, stats: Whole):
    return stats.total(np.dot(a.ravel(), b.ravel()))


# ---------------------------------------------------------------------------------------------
# Selection and sparsification of one task vector
# ---------------------------------------------------------------------------------------------


def smallest_mask(values: np.ndarray, k: int, stats: Whole = WHOLE) -> np.ndarray:
    """Boolean mask of the ``k`` smallest entries of a flat array, ties taken in index order.
    One partition (linear time), where mergekit sorts."""
    n = stats.total(values.size)
    if k <= 0:
        return np.zeros(values.size, bool)
    if k >= n:
        return np.ones(values.size, bool)
    kth = stats.kth_smallest(values.copy(), k)
    mask = values < kth
    missing = k - stats.total(int(np.count_nonzero(mask)))
    equal = np.flatnonzero(values == kth)
    take = min(max(missing - stats.equal_before(len(equal)), 0), len(equal))
    mask[equal[:take]] = True
    return mask


def _rescaled(delta: np.ndarray, kept: np.ndarray, rescale: bool, stats: Whole,
              eps: float = 1e-7):
    """``delta * kept``, in place (callers own ``delta``); with ``rescale`` scaled back to the
    L1 norm it had (mergekit's ``RescaleNorm.l1``), unless either norm is below ``eps``."""
    before = stats.total(np.abs(delta).sum()) if rescale else None
    delta *= kept
    return _rescale_to(delta, before, stats, eps) if rescale else delta


def _rescale_to(masked: np.ndarray, before, stats: Whole, eps: float = 1e-7):
    after = stats.total(np.abs(masked).sum())
    if before < eps or after < eps:
        return masked
    masked *= before / after
    return masked


def magnitude(delta, density: float, rescale: bool = False, stats: Whole = WHOLE,
              scale=1, **_):
    """Keep the largest ``k = max(1, int(density * n))`` entries by magnitude (TIES trimming):
    those above the k-th largest and, of those equal to it, the first few in index order, so
    exactly k. Linear time where mergekit sorts; chunked, in place, and multiplied by ``scale``
    (the model's weight) in the same pass."""
    if density >= 1:
        delta *= scale
        return delta
    n = stats.total(delta.size)
    if density <= 0 or n == 0:
        return np.zeros_like(delta)
    k = max(1, int(density * n))
    flat = delta.reshape(-1)
    if stats is WHOLE:
        threshold, greater = kth_largest_magnitude(flat, k)
        ties = k - greater
    else:
        threshold = stats.kth_smallest(np.abs(flat), n - k + 1)
        greater = stats.total(sum(int(np.count_nonzero(np.abs(part) > threshold))
                                  for part in chunks(flat)))
        equal = sum(int(np.count_nonzero(np.abs(part) == threshold)) for part in chunks(flat))
        ties = min(max(k - greater - stats.equal_before(equal), 0), equal)
    before = stats.total(np.abs(delta).sum()) if rescale else None
    for part in chunks(flat):
        magnitudes = np.abs(part)
        kept = magnitudes > threshold
        if ties:
            equal = np.flatnonzero(magnitudes == threshold)[:ties]
            kept[equal] = True
            ties -= equal.size
        part *= kept
        if not rescale:
            part *= scale
    if rescale:
        delta = _rescale_to(delta, before, stats)
        delta *= scale
    return delta


def magnitude_outliers(delta, density: float, gamma: float, rescale: bool = False,
                       stats: Whole = WHOLE, scale=1, **_):
    """Breadcrumbs: drop the largest ``gamma`` fraction and then the smallest, keeping
    ``int(density * n)`` entries (fewer outliers are dropped if both cannot be met)."""
    if density >= 1:
        delta *= scale
        return delta
    n = stats.total(delta.size)
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    magnitudes = np.abs(delta).ravel()
    kept = (smallest_mask(magnitudes, bottom + keep, stats)
            & ~smallest_mask(magnitudes, bottom, stats))
    delta = _rescaled(delta, kept.reshape(delta.shape), rescale, stats)
    delta *= scale
    return delta


def bernoulli(delta, density: float, rescale: bool = True, rng=None, stats: Whole = WHOLE,
              scale=1, **_):
    """DARE: keep each entry with probability ``density``, rescale to the original L1 norm."""
    if density < 1:
        delta = _rescaled(delta, rng.random(delta.shape) < density, rescale, stats)
    delta *= scale
    return delta


def della_magprune(delta, density: float, epsilon: float, rescale: bool = True, rng=None,
                   stats: Whole = WHOLE, scale=1, **_):
    """DELLA: keep probability from ``density - epsilon`` (smallest in its row) rising linearly
    with the magnitude rank to ``density + epsilon`` (largest). Ranks are within rows, so a
    sharded merge must hold whole rows."""
    if density >= 1:
        delta *= scale
        return delta
    if density <= 0:
        return np.zeros_like(delta)
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della: density {density} ± epsilon {epsilon} must stay inside (0, 1)")
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim >= 2 else delta.reshape(1, -1)
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1)
    spread = max(rows.shape[1] - 1, 1)
    keep_probability = (density - epsilon) + (ranks / spread) * 2 * epsilon
    kept = rng.random(rows.shape) < keep_probability
    delta = _rescaled(delta, kept.reshape(delta.shape), rescale, stats)
    delta *= scale
    return delta
