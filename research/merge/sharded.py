"""Sharded merges on orbax checkpoints: every process merges only the rows it holds.

Why: models that do not fit one host (issue 5, deliverable 4). Methods and parameters are
mergekit's (Goddard et al. 2024, "Arcee's MergeKit"), run by :mod:`research.merge.kernels`;
the result equals :func:`research.merge.trees.merge` of the same trees.

Idea: restore each leaf as a global ``jax.Array`` split along axis 0 over every device of every
process, so a process reads and holds only its own block of rows, and merge that block with
:func:`kernels.merge_tensor`. The few whole-tensor statistics the methods need (sums for norms,
dots and L1 rescaling; the k-th smallest magnitude for TIES and breadcrumbs; how many tied
entries earlier blocks hold) go through :class:`Distributed`, which combines per-process
partials with small all-gathers. Rows stay whole, so row-wise methods (DELLA's ranks, Model
Stock ``filter_wise``) need nothing more; NuSLERP ``nuslerp_row_wise`` normalises over axis 0,
so its leaves are gathered whole on every process. Leaves whose axis 0 does not divide the
device count (and scalars) are held whole by every process, and each merges them alone. Each
block draws its own random drops (``tensor_name`` ``path@first_row``); a leaf merged whole uses
the path, so a single process reproduces :func:`trees.merge` exactly, random drops included.

Leaves are restored a group at a time (orbax partial restore), so a process holds about
``(models + 1) * group_bytes / processes`` of inputs, the merge's working copies of one leaf's
rows, leaves held whole, and its share of the output. Orbax writes the output, each process its
own shards, into a temporary folder renamed to ``out_path`` once complete (on a POSIX
filesystem; on GCS it marks completion with a commit file instead): a killed merge leaves only
a ``*.orbax-checkpoint-tmp-*`` folder, never a checkpoint at ``out_path``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research import tree
from research.merge import kernels, sparsify, trees

_DIGIT = 8  # bits resolved per all-gather round of the k-th smallest search


class Distributed(sparsify.Whole):
    """Statistics of a tensor split into one piece per process, ordered by ``position`` (the
    piece's first row). Every process must call the same methods in the same order, as the
    kernels do: their branches depend only on parameters and global statistics."""

    def __init__(self, position: int | None = None):
        self.position = jax.process_index() if position is None else position

    @staticmethod
    def _gather(value) -> np.ndarray:
        """Every process's ``value``, stacked on a new axis 0. Sent as raw bytes, so float64
        and int64 survive JAX's default 32-bit mode exactly."""
        value = np.asarray(value)
        raw = np.ascontiguousarray(value.reshape(-1)).view(np.uint8)
        gathered = multihost_utils.process_allgather(raw)
        return np.asarray(gathered).view(value.dtype).reshape((-1,) + value.shape)

    def total(self, value):
        value = np.asarray(value)
        return self._gather(value).sum(axis=0, dtype=value.dtype)

    def kth_smallest(self, values: np.ndarray, k: int):
        """Exact, by radix selection over the order-preserving integer image of the float bits:
        each round counts the candidates' next ``_DIGIT`` bits locally and sums the counts
        across processes (4 rounds for float32, 8 for float64, instead of bisection's 32/64)."""
        keys = _ordered_keys(values)
        prefix = 0
        for shift in range(keys.dtype.itemsize * 8 - _DIGIT, -1, -_DIGIT):
            digits = ((keys >> shift) & (2 ** _DIGIT - 1)).astype(np.intp)
            counts = self.total(np.bincount(digits, minlength=2 ** _DIGIT).astype(np.int64))
            below = np.cumsum(counts)
            digit = int(np.searchsorted(below, k))
            k -= int(below[digit] - counts[digit])
            keys = keys[digits == digit]
            prefix = (prefix << _DIGIT) | digit
        return _float_of_key(prefix, values.dtype)

    def equal_before(self, count: int) -> int:
        gathered = self._gather(np.array([self.position, count], np.int64))
        return int(gathered[gathered[:, 0] < self.position, 1].sum())


def _ordered_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integers ordered as the floats are (-0.0 just below 0.0): flip every bit of
    negatives, only the sign bit of the rest."""
    values = np.ascontiguousarray(values).reshape(-1)
    unsigned = np.dtype(f"u{values.dtype.itemsize}")
    bits = values.view(unsigned)
    sign = unsigned.type(1) << unsigned.type(8 * unsigned.itemsize - 1)
    return np.where(bits & sign, ~bits, bits | sign)


def _float_of_key(key: int, dtype) -> np.floating:
    """The inverse of :func:`_ordered_keys` for one key."""
    sign = 1 << (8 * np.dtype(dtype).itemsize - 1)
    bits = key ^ sign if key & sign else ~key & (2 * sign - 1)
    return np.array(bits, f"u{np.dtype(dtype).itemsize}").view(dtype)[()]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The params of an orbax checkpoint: ``keys`` maps each param path to its path in the
    saved tree, ``metadata`` to its orbax array metadata (shape, dtype)."""
    directory: str
    keys: dict
    metadata: dict

    def restore(self, checkpointer, paths: Sequence[str], shardings: dict) -> dict:
        """``{path: global jax.Array}`` of ``paths`` only, each with its sharding."""
        item = tree.unflatten({self.keys[p]: jax.ShapeDtypeStruct(
            self.metadata[p].shape, self.metadata[p].dtype, sharding=shardings[p])
            for p in paths})
        restored = tree.flatten(checkpointer.restore(self.directory, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
        return {p: restored[self.keys[p]] for p in paths}


def open_checkpoint(checkpointer, path: str) -> Checkpoint:
    """A params checkpoint (a tree saved with ``ocp.StandardCheckpointer``), or a Scion run:
    its folder, one step of it or the step's ``state`` item, whose params are the union of the
    train state's ``trainable`` and ``frozen`` trees (the newest step of a run folder)."""
    runs = os.path.join(path, "checkpoints")
    if os.path.isdir(runs):
        steps = [int(name) for name in os.listdir(runs) if name.isdigit()]
        if not steps:
            raise ValueError(f"{path}: a run folder without a complete checkpoint")
        path = os.path.join(runs, str(max(steps)))
    if os.path.isdir(os.path.join(path, "state")):
        path = os.path.join(path, "state")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such checkpoint folder")
    metadata = getattr(checkpointer.metadata(path).item_metadata, "tree", None)
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: not an orbax checkpoint of a tree of arrays")
    saved = tree.flatten(metadata)
    keys = {p: p for p in saved}
    if {"step", "trainable"} <= set(metadata):
        keys = {p.split("/", 1)[1]: p for p in saved if p.startswith(("trainable/", "frozen/"))}
    for name, key in keys.items():
        if not hasattr(saved[key], "shape"):
            raise ValueError(f"{path}: {name!r} is not an array (got {type(saved[key]).__name__})")
    return Checkpoint(path, keys, {name: saved[key] for name, key in keys.items()})


# ---------------------------------------------------------------------------------------------
# Rows of a process
# ---------------------------------------------------------------------------------------------


def default_mesh() -> Mesh:
    """Every device of every process on one axis, each process's devices together."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("rows",))


def _check_mesh(mesh: Mesh) -> None:
    owners = [d.process_index for d in mesh.devices.flat]
    if owners != sorted(owners) or set(owners) != set(range(jax.process_count())):
        raise ValueError(f"mesh: must hold devices of all {jax.process_count()} processes, each "
                         f"process's devices together (as default_mesh()); got processes {owners}")


def _sharding(mesh: Mesh, shape: tuple, whole: bool = False) -> NamedSharding:
    """Axis 0 split over every device of ``mesh``, or replicated where it does not divide."""
    if whole or not shape or shape[0] % mesh.devices.size:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def local_rows(array: jax.Array) -> tuple[int, np.ndarray]:
    """``(first row, this process's rows)`` of a global array split along axis 0 (replicas of
    a block are read once)."""
    blocks = {}
    for shard in array.addressable_shards:
        blocks.setdefault((shard.index[0].start or 0) if array.ndim else 0, shard)
    starts = sorted(blocks)
    pieces = [np.asarray(blocks[s].data) for s in starts]
    if len(pieces) == 1:
        return starts[0], pieces[0]
    if starts[1:] != [s + len(p) for s, p in zip(starts, pieces)][:-1]:
        raise ValueError(f"mesh: this process's rows {starts} are not contiguous")
    return starts[0], np.concatenate(pieces)


def _global(rows: np.ndarray, start: int, shape: tuple, sharding: NamedSharding) -> jax.Array:
    """The global array whose rows ``start:start + len(rows)`` this process holds."""
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        if index:
            first = index[0].start or 0
            stop = shape[0] if index[0].stop is None else index[0].stop
            index = (slice(first - start, stop - start),) + tuple(index[1:])
        arrays.append(jax.device_put(rows[index], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


# ---------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------


def _needs_columns(method: str, params: dict, count: int) -> bool:
    """NuSLERP row-wise normalises over axis 0, which sharding splits."""
    if method != "nuslerp":
        return False
    done = kernels.complete_params(kernels.method(method), params, count)
    return done["nuslerp_row_wise"] and not done["nuslerp_flatten"]


def _merge_leaf(method, path, inputs, base, params, seed, sharding) -> jax.Array:
    first = inputs[0]
    if not jnp.issubdtype(first.dtype, jnp.floating):  # numpy's misses bfloat16
        return base if base is not None else first
    blocks = [local_rows(a) for a in inputs + ([base] if base is not None else [])]
    start, pieces = blocks[0][0], [rows for _, rows in blocks]
    whole = pieces[0].shape == first.shape
    stats = sparsify.WHOLE if whole else Distributed(start)
    # Counted across processes, so that every process raises, none waits in a collective.
    bad = np.flatnonzero(stats.total(np.array(
        [np.count_nonzero(~np.isfinite(p)) for p in pieces], np.int64)))
    if len(bad):
        which = f"model {bad[0]}" if bad[0] < len(inputs) else "the base model"
        raise ValueError(f"{which} has NaN or Inf in {path}")
    try:
        merged = kernels.merge_tensor(
            method, pieces[:len(inputs)], None if base is None else pieces[-1], params,
            seed=seed, tensor_name=path if whole else f"{path}@{start}", stats=stats)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return _global(np.asarray(merged).astype(first.dtype), start, first.shape, sharding)


def _groups(paths, sizes: dict, limit: int):
    group, size = [], 0
    for path in paths:
        if group and size + sizes[path] > limit:
            yield group
            group, size = [], 0
        group.append(path)
        size += sizes[path]
    if group:
        yield group


def merge_checkpoints(method: str, model_paths: Sequence[str], base_path: str | None,
                      out_path: str, *, parameters: dict | None = None,
                      model_parameters: Sequence[dict] | None = None, seed: int = 0,
                      mesh: Mesh | None = None, group_bytes: int = 2 ** 28) -> str:
    """Merge orbax checkpoints into a new params checkpoint at ``out_path``, as
    :func:`trees.merge` would merge the restored trees. Every process calls it with the same
    arguments; leaves are restored ``group_bytes`` (global bytes per model) at a time."""
    model_parameters = trees.check_call(method, len(model_paths), base_path is not None,
                                        model_parameters)
    if os.path.exists(out_path):
        raise ValueError(f"out_path {out_path!r} exists; a merge never overwrites")
    mesh = mesh or default_mesh()
    _check_mesh(mesh)
    with ocp.PyTreeCheckpointer() as checkpointer:
        merged = _merge_all(checkpointer, method, model_paths, base_path, parameters,
                            model_parameters, seed, mesh, group_bytes)
    with ocp.StandardCheckpointer() as saver:
        saver.save(os.path.abspath(out_path), tree.unflatten(merged))
    return out_path


def _merge_all(checkpointer, method, model_paths, base_path, parameters, model_parameters,
               seed, mesh, group_bytes) -> dict:
    models = [open_checkpoint(checkpointer, p) for p in model_paths]
    base = open_checkpoint(checkpointer, base_path) if base_path is not None else None
    reference = (base or models[0]).metadata
    for model in models:
        tree.check_same_structure(tree.unflatten(reference), tree.unflatten(model.metadata))

    paths = list(models[0].metadata)
    params_by_path = trees.resolve_params(method, paths, parameters, model_parameters)
    shardings = {p: _sharding(mesh, tuple(models[0].metadata[p].shape),
                              _needs_columns(method, params_by_path[p], len(models)))
                 for p in paths}
    sizes = {p: np.prod(m.shape, dtype=np.int64) * np.dtype(m.dtype).itemsize
             for p, m in models[0].metadata.items()}
    merged = {}
    for group in _groups(paths, sizes, group_bytes):
        inputs = [m.restore(checkpointer, group, shardings) for m in models]
        bases = base.restore(checkpointer, group, shardings) if base is not None else None
        for path in group:
            merged[path] = _merge_leaf(
                method, path, [i[path] for i in inputs], None if bases is None else bases[path],
                params_by_path[path], seed, _sharding(mesh, tuple(inputs[0][path].shape)))
        del inputs, bases
    return merged
