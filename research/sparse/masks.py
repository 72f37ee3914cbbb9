"""Masks: which entries of a parameter tree may change.

A mask has the params' structure. Each leaf is a Python bool (the whole leaf in or out) or a
boolean array of the leaf's shape (single entries, or slices such as heads or channels). Masks
come from ordered ``(regex, value)`` rules over path names, where a value is True, False or a
:class:`Slices` (indices along one axis), or from scores: the top-K entries by magnitude, as
LT-SFT (Ansell et al., 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer") keeps
the K most changed entries of a full fine-tune.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from research import tree as tree_lib
from research.sites import kth_largest_magnitude


@dataclasses.dataclass(frozen=True)
class Slices:
    """Entries whose index along ``axis`` is one of ``indices`` (heads, channels, rows)."""

    axis: int
    indices: Sequence[int]

    def array(self, shape: tuple, path: str) -> np.ndarray:
        if not -len(shape) <= self.axis < len(shape):
            raise ValueError(f"mask slice of {path!r}: axis {self.axis} is out of range for "
                             f"shape {shape}")
        size = shape[self.axis]
        indices = np.asarray(self.indices, np.int64)
        if indices.size and (indices.min() < -size or indices.max() >= size):
            raise ValueError(f"mask slice of {path!r}: indices {list(self.indices)} out of "
                             f"range for axis {self.axis} of size {size}")
        chosen = np.zeros(size, bool)
        chosen[indices] = True
        view = [1] * len(shape)
        view[self.axis] = size
        return np.broadcast_to(chosen.reshape(view), shape).copy()


def _shape(leaf) -> tuple:
    return tuple(getattr(leaf, "shape", ()))


def check_density(density: float, what: str = "density") -> float:
    if not 0 < density <= 1:
        raise ValueError(f"{what}={density!r} is outside (0, 1]")
    return float(density)


def from_rules(rules, params: Mapping, *, what: str = "mask rule") -> dict:
    """A mask of ``params``: each leaf gets the value of the first rule matching its path
    (True, False or :class:`Slices`); unmatched leaves are False."""
    flat = tree_lib.flatten(params)
    chosen = tree_lib.resolve_rules(rules, flat, default=False, what=what)
    mask = {}
    for path, value in chosen.items():
        if isinstance(value, Slices):
            mask[path] = value.array(_shape(flat[path]), path)
        elif isinstance(value, (bool, np.bool_)):
            mask[path] = bool(value)
        else:
            raise ValueError(f"{what} for {path!r}: value {value!r} is not True, False or "
                             "Slices")
    return tree_lib.unflatten(mask)


def check(mask: Mapping, params: Mapping) -> None:
    """Raise, naming the path, unless ``mask`` has the params' leaves and shapes."""
    flat_mask, flat_params = tree_lib.flatten(mask), tree_lib.flatten(params)
    for path in flat_params:
        if path not in flat_mask:
            raise ValueError(f"mask has no leaf {path!r}; the params have it")
    for path, leaf in flat_mask.items():
        if path not in flat_params:
            near = ", ".join(tree_lib.closest_paths(path, flat_params))
            raise ValueError(f"mask leaf {path!r} is not a parameter; closest: {near}")
        if not isinstance(leaf, (bool, np.bool_)):
            if np.asarray(leaf).dtype != bool or _shape(leaf) != _shape(flat_params[path]):
                raise ValueError(f"mask leaf {path!r} is {np.asarray(leaf).dtype} "
                                 f"{_shape(leaf)}; expected bool {_shape(flat_params[path])} "
                                 "or a Python bool")


def entries(mask: Mapping, params: Mapping) -> dict[str, np.ndarray]:
    """Flat indices (int64, ascending) of the selected entries, per leaf that has any."""
    check(mask, params)
    flat_params = tree_lib.flatten(params)
    selected = {}
    for path, leaf in tree_lib.flatten(mask).items():
        if isinstance(leaf, (bool, np.bool_)):
            if leaf:
                selected[path] = np.arange(int(np.prod(_shape(flat_params[path]))))
        elif np.any(leaf):
            selected[path] = np.flatnonzero(np.asarray(leaf))
    return selected


def count(mask: Mapping, params: Mapping) -> int:
    return sum(index.size for index in entries(mask, params).values())


def density(mask: Mapping, params: Mapping) -> float:
    """Share of all entries of ``params`` that the mask selects."""
    return count(mask, params) / max(tree_lib.count(params), 1)


def top_k(scores: Mapping, *, density: float | None = None, k: int | None = None,
          rules=((".*", True),)) -> dict:
    """The mask of the ``k`` entries (or ``density`` of the entries of the leaves ``rules``
    select) with the largest ``|score|``, chosen globally across leaves; exactly ``k``, ties
    broken by position. Leaves the rules leave out are False."""
    flat = {path: np.asarray(value) for path, value in tree_lib.flatten(scores).items()}
    eligible = tree_lib.resolve_rules(rules, flat, default=False, what="top_k rule")
    eligible = [path for path, chosen in eligible.items() if chosen is True]
    total = sum(flat[path].size for path in eligible)
    if (density is None) == (k is None):
        raise ValueError("top_k needs exactly one of density and k")
    if k is None:
        k = max(1, int(check_density(density) * total))
    if not 0 < k <= total:
        raise ValueError(f"top_k: k={k} is outside [1, {total}] (the eligible entries)")
    joined = np.concatenate([flat[path].ravel() for path in eligible])
    threshold, above = kth_largest_magnitude(joined, k)
    ties_left = k - above
    mask = {path: False for path in flat}
    for path in eligible:
        magnitudes = np.abs(flat[path])
        chosen = magnitudes > threshold
        if ties_left:
            tied = np.flatnonzero(magnitudes == threshold)[:ties_left]
            chosen.ravel()[tied] = True
            ties_left -= tied.size
        mask[path] = chosen
    return tree_lib.unflatten(mask)
