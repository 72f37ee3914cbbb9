"""Shardings from rules: a named device mesh and logical-axis rules chosen in the config.

Models name every weight and activation axis logically ('batch', 'embed', 'heads', 'mlp'...);
the config maps those names to mesh axes with an ordered rule list (MaxText's idea, big_vision's
rule style). The same list drives parameters here and activation constraints inside the model
(``flax.linen.logical_axis_rules``), so changing FSDP into tensor parallelism is a config edit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research import tree as tree_lib

MESH_AXES = ("data", "fsdp", "tensor")

# Data parallel over 'data', parameters and batch split over 'fsdp', heads/MLP over 'tensor'.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("position", "fsdp"),
)


def make_mesh(shape: dict | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes ('data', 'fsdp', 'tensor'). One size may be -1: it takes what is left."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axis {sorted(unknown)[0]!r} is not one of {MESH_AXES}")
    sizes = [shape.get(axis, 1) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {shape} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def partition_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                   mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for one array: rules are tried in order; a rule applies to the first
    dimension whose logical name it fully matches, if its mesh axes are unused by this array and
    divide that dimension (otherwise the dimension stays replicated)."""
    if logical_axes is None:
        return PartitionSpec()
    assigned: list = [None] * len(shape)
    used: set[str] = set()
    for name_pattern, mesh_axes in rules:
        axes = _as_tuple(mesh_axes)
        for dim, name in enumerate(logical_axes):
            if name is None or assigned[dim] is not None or not re.fullmatch(name_pattern, name):
                continue
            if used & set(axes) or shape[dim] % math.prod(mesh.shape[a] for a in axes):
                continue
            assigned[dim] = axes[0] if len(axes) == 1 else axes
            used.update(axes)
            break
    return PartitionSpec(*assigned)


def param_shardings(shapes, logical_axes, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """NamedSharding for every leaf of ``shapes`` from its logical axes (same structure)."""
    flat_axes = tree_lib.flatten(logical_axes) if logical_axes else {}
    def one(path, leaf):
        spec = partition_spec(flat_axes.get(path), leaf.shape, mesh, rules)
        return NamedSharding(mesh, spec)
    return tree_lib.map_with_path(one, shapes)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis split as the 'batch' rule says; other axes replicated."""
    mesh_axes = next((axes for name, axes in rules if re.fullmatch(name, "batch")), None)
    return NamedSharding(mesh, PartitionSpec(mesh_axes))

