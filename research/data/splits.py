"""Fixed train/validation/test splits from a seeded permutation.

Every dataset here is split once, at build time, by shuffling example indices with
a fixed seed and cutting 80/10/10. The split is a pure function of the example
count and the seed, so rebuilding anywhere gives the same examples in each split.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "validation", "test")


def split_sizes(count: int, held_out: float = 0.1) -> dict[str, int]:
    """Sizes for ``count`` examples: ``held_out`` each for validation and test, rest train."""
    evaluation = round(count * held_out)
    return {"train": count - 2 * evaluation, "validation": evaluation, "test": evaluation}


def split_indices(count: int, seed: int) -> dict[str, np.ndarray]:
    """Disjoint index arrays (sorted, for stable generation) covering ``range(count)``."""
    order = np.random.default_rng(seed).permutation(count)
    sizes = split_sizes(count)
    bounds = np.cumsum([0] + [sizes[name] for name in SPLITS])
    return {name: np.sort(order[start:stop])
            for name, start, stop in zip(SPLITS, bounds[:-1], bounds[1:])}
