"""Sparse deltas: a fine-tune stored as indices and values per leaf, composable by addition.

LT-SFT (Ansell et al., 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer")
stores each task's or language's update φ as a sparse difference from the shared base θ0, so
updates made separately compose as θ0 + φa + φb. A delta remembers the shape of every leaf of
the base it was made for; applying it to, or composing it with, anything else fails naming the
first differing path. On disk it is one safetensors file of ``<path>::indices`` and
``<path>::values`` (size proportional to density), written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from research import tree as tree_lib
from research.sparse import masks as masks_lib

_INDICES, _VALUES, _META = "::indices", "::values", "scion_sparse_delta"


@dataclasses.dataclass(frozen=True)
class SparseDelta:
    """``values[path]`` added at flat positions ``indices[path]`` (ascending, unique) of the
    base leaf ``path``; ``shapes`` holds every leaf shape of that base."""

    shapes: dict[str, tuple]
    indices: dict[str, np.ndarray]
    values: dict[str, np.ndarray]

    def __post_init__(self):
        for path, index in self.indices.items():
            if path not in self.shapes:
                raise ValueError(f"sparse delta leaf {path!r} is not in its base's shapes")
            if index.shape != self.values[path].shape:
                raise ValueError(f"sparse delta leaf {path!r}: {index.size} indices but "
                                 f"{self.values[path].size} values")

    @property
    def count(self) -> int:
        return sum(index.size for index in self.indices.values())

    @property
    def density(self) -> float:
        return self.count / max(sum(int(np.prod(s)) for s in self.shapes.values()), 1)

    def select(self, pattern: str) -> SparseDelta:
        """The part of the delta whose leaves fully match the regex ``pattern`` (a task's
        body without its head, say)."""
        keep = tree_lib.resolve_rules([(pattern, True)], self.indices, default=False,
                                      what="sparse delta selection")
        return SparseDelta(self.shapes, {p: i for p, i in self.indices.items() if keep[p]},
                           {p: v for p, v in self.values.items() if keep[p]})


def shapes_of(params: Mapping) -> dict[str, tuple]:
    """Every leaf's shape, by path (what a delta checks a base against)."""
    return {path: tuple(np.shape(leaf)) for path, leaf in tree_lib.flatten(params).items()}


def check_base(delta: SparseDelta, shapes: dict[str, tuple], what: str) -> None:
    """Raise unless ``shapes`` (of a base tree or another delta's base) match the delta's."""
    for path, shape in delta.shapes.items():
        if path not in shapes:
            near = ", ".join(tree_lib.closest_paths(path, shapes))
            raise ValueError(f"sparse delta was made for a base with {path!r}, which {what} "
                             f"lacks; closest: {near}")
        if tuple(shapes[path]) != tuple(shape):
            raise ValueError(f"sparse delta was made for {path!r} of shape {tuple(shape)}; "
                             f"{what} has {tuple(shapes[path])}")
    extra = sorted(set(shapes) - set(delta.shapes))
    if extra:
        raise ValueError(f"{what} has {extra[0]!r}, which the sparse delta's base lacks")


def from_mask(mask: Mapping, params: Mapping) -> SparseDelta:
    """A zero delta on the entries ``mask`` selects (LT-SFT's reset to θ0 before retraining);
    ``params`` may be arrays or shapes."""
    selected = masks_lib.entries(mask, params)
    flat = tree_lib.flatten(params)
    return SparseDelta(shapes_of(params), selected,
                       {p: np.zeros(i.shape, flat[p].dtype) for p, i in selected.items()})


def difference(finetuned: Mapping, base: Mapping, mask: Mapping) -> SparseDelta:
    """``finetuned - base`` at the entries ``mask`` selects."""
    check_base(SparseDelta(shapes_of(base), {}, {}), shapes_of(finetuned), "the fine-tuned tree")
    selected = masks_lib.entries(mask, base)
    flat_ft, flat_base = tree_lib.flatten(finetuned), tree_lib.flatten(base)
    values = {path: (np.asarray(flat_ft[path]).ravel()[index]
                     - np.asarray(flat_base[path]).ravel()[index])
              for path, index in selected.items()}
    return SparseDelta(shapes_of(base), selected, values)


def apply(params: Mapping, delta: SparseDelta, scale: float = 1.0) -> dict:
    """``params + scale * delta``; entries the delta lacks are returned bit for bit."""
    check_base(delta, shapes_of(params), "the params")
    flat = dict(tree_lib.flatten(params))
    for path, index in delta.indices.items():
        leaf = jnp.asarray(flat[path])
        added = leaf.reshape(-1).at[index].add(jnp.asarray(delta.values[path] * scale,
                                                           leaf.dtype))
        flat[path] = added.reshape(leaf.shape)
    return tree_lib.unflatten(flat)


def compose(*deltas: SparseDelta) -> SparseDelta:
    """One delta equal to the sum of ``deltas`` (all for the same base): the union of their
    entries, values added where they overlap. Two deltas compose in either order to the same
    bits (float addition commutes)."""
    if not deltas:
        raise ValueError("compose needs at least one sparse delta")
    first = deltas[0]
    for other in deltas[1:]:
        check_base(first, other.shapes, "another delta's base")
    indices, values = {}, {}
    for path in first.shapes:
        parts = [(d.indices[path], d.values[path]) for d in deltas if path in d.indices]
        if not parts:
            continue
        joined = np.concatenate([index for index, _ in parts])
        union, inverse = np.unique(joined, return_inverse=True)
        total = np.zeros(union.shape, np.result_type(*[v for _, v in parts]))
        for (index, value), positions in zip(parts, np.split(
                inverse, np.cumsum([index.size for index, _ in parts])[:-1])):
            total[positions] += value
        indices[path], values[path] = union, total
    return SparseDelta(dict(first.shapes), indices, values)


def densify(delta: SparseDelta, dtype=np.float32) -> dict:
    """The delta as a dense tree over its base's structure (zeros where it has no entry)."""
    flat = {}
    for path, shape in delta.shapes.items():
        leaf = np.zeros(int(np.prod(shape)), dtype)
        if path in delta.indices:
            leaf[delta.indices[path]] = delta.values[path]
        flat[path] = leaf.reshape(shape)
    return tree_lib.unflatten(flat)


def as_mask(delta: SparseDelta) -> dict:
    """The entries the delta covers, as a mask over its base."""
    flat = {}
    for path, shape in delta.shapes.items():
        chosen = np.zeros(int(np.prod(shape)), bool)
        chosen[delta.indices.get(path, [])] = True
        flat[path] = chosen.reshape(shape)
    return tree_lib.unflatten(flat)


def save(delta: SparseDelta, path: str) -> None:
    """Write ``delta`` as safetensors, atomically (a crash leaves any older file intact)."""
    tensors = {}
    for leaf, index in delta.indices.items():
        # int32 indices halve the file unless a leaf has more than 2**31 entries.
        kind = np.int32 if np.prod(delta.shapes[leaf]) < 2**31 else np.int64
        tensors[leaf + _INDICES] = index.astype(kind)
        tensors[leaf + _VALUES] = np.ascontiguousarray(delta.values[leaf])
    metadata = {_META: json.dumps({p: list(s) for p, s in delta.shapes.items()})}
    partial = f"{path}.partial"
    safetensors.numpy.save_file(tensors, partial, metadata=metadata)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def load(path: str) -> SparseDelta:
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    metadata = header.get("__metadata__", {})
    if _META not in metadata:
        raise ValueError(f"{path} is not a Scion sparse delta (no {_META!r} metadata)")
    shapes = {p: tuple(s) for p, s in json.loads(metadata[_META]).items()}
    tensors = safetensors.numpy.load_file(path)
    leaves = [name[:-len(_INDICES)] for name in tensors if name.endswith(_INDICES)]
    return SparseDelta(shapes, {p: tensors[p + _INDICES].astype(np.int64) for p in leaves},
                       {p: tensors[p + _VALUES] for p in leaves})

