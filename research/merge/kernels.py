"""Merge methods on one tensor at a time, with mergekit's semantics and names.

Every method here takes the same tensor from each input model (and the base model's, when it
has one) and returns the merged tensor; :mod:`research.merge.trees` runs them over parameter
trees and :mod:`research.merge.mergekit_config` over Hugging Face checkpoints. Parameters
follow mergekit 0.1.5 (Goddard et al. 2024, "Arcee's MergeKit"), so one config means the same
thing in both:

* ``linear`` — weighted average (Wortsman et al. 2022, "Model soups");
* ``task_arithmetic`` — base plus weighted task vectors (Ilharco et al. 2023, "Editing models
  with task arithmetic"); a negative weight negates a task;
* ``ties`` — trim each task vector to its largest ``density`` fraction, elect a sign per entry
  by the summed mass, average the entries that agree (Yadav et al. 2023, "TIES-Merging");
* ``dare_linear`` / ``dare_ties`` — drop entries at random with probability ``1 - density``
  and rescale (Yu et al. 2024, "Language models are Super Mario");
* ``breadcrumbs`` / ``breadcrumbs_ties`` — drop the largest ``gamma`` fraction (outliers) and
  the smallest entries (Davari & Belilovsky 2024, "Model Breadcrumbs");
* ``della`` / ``della_linear`` — drop at random with a keep probability that grows with the
  entry's magnitude rank within its row (Deep et al. 2024, "DELLA-Merging");
* ``model_stock`` — interpolate the fine-tunes' mean toward the base by the angle between
  their task vectors (Jang et al. 2024, "Model Stock");
* ``slerp`` / ``nuslerp`` — spherical interpolation of two models (or of their task vectors);
* ``passthrough`` — one model's tensor, optionally scaled (layer stacking is a plan of these).

Arrays are numpy on the host: a merge streams tensors from disk and never needs a device.
Trimming (:mod:`research.merge.sparsify`) is exact where mergekit's is (``ties`` keeps exactly
``k`` entries, ties broken by position); random drops use a numpy generator seeded per tensor,
so they match mergekit's statistics (density, rescaling), not its torch random stream.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from research import sites
from research.merge import sparsify
from research.merge.sparsify import WHOLE, Whole

SHARED, PER_MODEL = "shared", "per_model"
REQUIRED = object()  # default of a parameter that has none


@dataclasses.dataclass(frozen=True)
class Param:
    scope: str  # SHARED (one value) or PER_MODEL (one value per non-base input)
    default: object = REQUIRED


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    params: dict[str, Param]
    base: str  # "required", "optional" or "ignored"
    min_models: int = 1  # non-base inputs
    max_models: int | None = None


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


def _compute_dtype(array: np.ndarray):
    return np.float64 if array.dtype == np.float64 else np.float32


def linear(tensors, base, p, rng, stats, consume):
    weights = np.asarray(p["weight"], np.float64)
    total = weights.sum()
    if p["normalize"] and abs(total) < 1e-8:
        raise ValueError(f"linear: weights {weights.tolist()} sum to 0; normalize cannot divide")
    if not p["normalize"] and abs(total - 1) > 1e-6:
        raise ValueError(f"linear: weights {weights.tolist()} sum to {total:g}, not 1, with "
                         "normalize: false; set normalize: true or make them sum to 1")
    dtype = _compute_dtype(tensors[0])
    result = np.zeros(tensors[0].shape, dtype)
    for tensor, weight in zip(tensors, weights):
        result += tensor.astype(dtype, copy=False) * dtype(weight)
    return result / dtype(total) if p["normalize"] else result


@functools.cache
def _threads() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(os.cpu_count())


def _elect_and_sum(deltas, weights, normalize: bool, dtype):
    """TIES's disjoint merge: per entry, the sign of the summed weighted deltas wins; sum the
    deltas that agree with it (a zero delta agrees with neither sign), divided, with
    ``normalize``, by the summed weights of their models. With ``sign`` = ±1,
    ``delta * sign > 0`` is agreement and ``max(delta * sign, 0) * sign`` the agreeing part:
    plain vector arithmetic, chunked so every temporary stays in cache (about 5x faster here
    than masks over whole tensors). The result overwrites ``deltas[0]``."""
    flat = [d.reshape(-1) for d in deltas]
    one = dtype.type(1)

    def elect(start):
        parts = [f[start:start + sites.CHUNK] for f in flat]
        sign = np.copysign(one, sum(parts))  # a sum of -0.0 gets -1, but adds only zeros
        mixed, divisor = np.zeros_like(sign), np.zeros_like(sign)
        for part, weight in zip(parts, weights):
            signed = part * sign
            divisor += (signed > 0) * weight
            np.maximum(signed, 0, out=signed)
            signed *= sign
            mixed += signed
        if normalize:
            divisor[divisor == 0] = 1
            mixed /= divisor
        parts[0][...] = mixed

    for _ in _threads().map(elect, range(0, flat[0].size, sites.CHUNK)):
        pass
    return deltas[0]


def _task_arithmetic_family(trim, consensus: bool):
    """mergekit's generalized task arithmetic: sparsify each task vector, weight it, optionally
    keep only entries that agree with the elected sign, combine, normalise, scale by lambda.
    Task vectors overwrite their inputs when the caller hands them over (``consume``), so a
    merge holds no more than the inputs plus a temporary per thread."""

    def merge(tensors, base, p, rng, stats, consume):
        weights = np.asarray(p["weight"], base.dtype)
        rngs = rng.spawn(len(tensors))

        def weighted_task_vector(index):
            delta = np.subtract(tensors[index], base, out=tensors[index] if consume else None)
            if trim is None:
                delta *= weights[index]
                return delta
            extra = {k: p[k][index] for k in ("gamma", "epsilon") if k in p}
            return trim(delta, density=p["density"][index], rescale=p["rescale"],
                        rng=rngs[index], stats=stats, scale=weights[index], **extra)

        # Task vectors are independent: numpy releases the GIL, so threads use every core. A
        # sharded merge's statistics are collectives across processes, which must run in order.
        mapper = _threads().map if stats is WHOLE else map
        deltas = list(mapper(weighted_task_vector, range(len(tensors))))
        if consensus:
            mixed = _elect_and_sum(deltas, weights, p["normalize"], base.dtype)
        else:
            mixed = deltas[0]
            for delta in deltas[1:]:
                mixed += delta
            divisor = weights.sum()
            if p["normalize"]:
                mixed /= divisor if abs(divisor) >= 1e-8 else 1
        del deltas
        if p["lambda"] != 1:
            mixed *= base.dtype.type(p["lambda"])
        mixed += base
        return mixed

    return merge


def model_stock(tensors, base, p, rng, stats, consume):
    """Per tensor, or per output row with ``filter_wise`` (rows are then local to a piece)."""
    offsets = [t - base for t in tensors]
    if p["filter_wise"] and base.ndim >= 2:
        rows = [x.reshape(x.shape[0], -1) for x in offsets]
        norms = [np.linalg.norm(x, axis=-1) for x in rows]
        dots = {(i, j): (rows[i] * rows[j]).sum(-1) for i in range(len(rows))
                for j in range(i + 1, len(rows))}
    else:
        norms = [sparsify.norm(x, stats) for x in offsets]
        dots = {(i, j): sparsify.dot(offsets[i], offsets[j], stats) for i in range(len(offsets))
                for j in range(i + 1, len(offsets))}
    cosines = [np.clip(dot / np.maximum(norms[i] * norms[j], 1e-6), -1, 1)
               for (i, j), dot in dots.items()]
    cos = np.mean(cosines, axis=0)
    count = len(tensors)
    denominator = 1 + (count - 1) * cos
    singular = np.abs(denominator) < 1e-6
    t = np.where(singular, 0, count * cos / np.where(singular, 1, denominator)).astype(base.dtype)
    t = t.reshape(t.shape + (1,) * (base.ndim - t.ndim))
    average = sum(tensors) / base.dtype.type(count)
    return t * average + (1 - t) * base


def slerp_pair(t: float, v0, v1, stats: Whole = WHOLE, dot_threshold: float = 0.9995,
               eps: float = 1e-8):
    """Spherical interpolation from ``v0`` (t=0) to ``v1`` (t=1) over the whole tensor; nearly
    collinear pairs interpolate linearly."""
    norm_a, norm_b = sparsify.norm(v0, stats), sparsify.norm(v1, stats)
    norm_a, norm_b = (norm_a if norm_a > eps else 1), (norm_b if norm_b > eps else 1)
    unit_a, unit_b = v0 / v0.dtype.type(norm_a), v1 / v1.dtype.type(norm_b)
    dot = float(np.clip(sparsify.dot(unit_a, unit_b, stats), -1, 1))
    if abs(dot) > dot_threshold:
        coef_a, coef_b = 1 - t, t
    else:
        theta = np.arccos(dot)
        coef_a = np.sin((1 - t) * theta) / np.sin(theta)
        coef_b = np.sin(t * theta) / np.sin(theta)
    return v0.dtype.type(coef_a) * v0 + v0.dtype.type(coef_b) * v1


def slerp(tensors, base, p, rng, stats, consume):
    return slerp_pair(p["t"], base, tensors[0], stats)


def _nuslerp_combine(t: float, v0, v1, cos, eps: float = 1e-8):
    collinear = (1 - cos ** 2) <= eps ** 2
    theta = np.arccos(np.where(collinear, 0, cos))
    with np.errstate(invalid="ignore", divide="ignore"):
        spherical = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)
    return np.where(collinear, (1 - t) * v0 + t * v1, spherical)


def nuslerp(tensors, base, p, rng, stats, consume):
    """mergekit's NuSLERP: weights give ``t``; with a base, interpolates the task vectors;
    flattened (default: one angle per tensor), row-wise (one per column of axis 0) or one per
    vector along the last axis."""
    weights = p["weight"]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    v0, v1 = tensors
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    if p["nuslerp_flatten"] or v0.ndim == 0:
        u0 = v0 / max(sparsify.norm(v0, stats), 1e-7)
        u1 = v1 / max(sparsify.norm(v1, stats), 1e-7)
        merged = _nuslerp_combine(t, v0, v1, np.clip(sparsify.dot(u0, u1, stats), -1, 1))
    else:
        axis = 0 if p["nuslerp_row_wise"] else -1

        def unit(x):
            return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-7)
        cos = np.clip(np.sum(unit(v0) * unit(v1), axis=axis, keepdims=True), -1, 1)
        merged = _nuslerp_combine(t, v0, v1, cos)
    merged = merged.astype(v0.dtype)
    return merged if base is None else base + merged


def passthrough(tensors, base, p, rng, stats, consume):
    scale = p["scale"][0]
    return tensors[0] if scale is None else tensors[0] * tensors[0].dtype.type(scale)


def _task_params(**extra) -> dict[str, Param]:
    return {"weight": Param(PER_MODEL), "density": Param(PER_MODEL, 1.0),
            "normalize": Param(SHARED, False), "rescale": Param(SHARED, False),
            "lambda": Param(SHARED, 1.0), **extra,
            # Accepted for mergekit configs; it only sets the dtype of mergekit's sign mask.
            "int8_mask": Param(SHARED, False)}


def _task_method(name, trim, consensus, normalize, rescale, **extra) -> Method:
    params = _task_params(**extra)
    params["normalize"] = Param(SHARED, normalize)
    params["rescale"] = Param(SHARED, rescale)
    return Method(name, _task_arithmetic_family(trim, consensus), params, "required")


_GAMMA = {"gamma": Param(PER_MODEL, 0.01)}
_EPSILON = {"epsilon": Param(PER_MODEL, 0.15)}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", linear, {"weight": Param(PER_MODEL),
                              "normalize": Param(SHARED, True)}, "ignored"),
    _task_method("task_arithmetic", None, False, False, False),
    _task_method("ties", sparsify.magnitude, True, True, False),
    _task_method("dare_ties", sparsify.bernoulli, True, False, True),
    _task_method("dare_linear", sparsify.bernoulli, False, False, True),
    _task_method("breadcrumbs", sparsify.magnitude_outliers, False, False, False, **_GAMMA),
    _task_method("breadcrumbs_ties", sparsify.magnitude_outliers, True, False, False, **_GAMMA),
    _task_method("della", sparsify.della_magprune, True, True, True, **_EPSILON),
    _task_method("della_linear", sparsify.della_magprune, False, False, True, **_EPSILON),
    Method("model_stock", model_stock, {"filter_wise": Param(SHARED, False)}, "required",
           min_models=2),
    Method("slerp", slerp, {"t": Param(SHARED)}, "required", 1, 1),
    Method("nuslerp", nuslerp, {"weight": Param(PER_MODEL),
                                "nuslerp_row_wise": Param(SHARED, False),
                                "nuslerp_flatten": Param(SHARED, True)}, "optional", 2, 2),
    Method("passthrough", passthrough, {"scale": Param(PER_MODEL, None)}, "ignored", 1, 1),
)}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def check_inputs(spec: Method, count: int, has_base: bool) -> None:
    """The model count and base a method needs (``count`` excludes the base)."""
    if spec.base == "required" and not has_base:
        raise ValueError(f"{spec.name} needs a base model (base_model)")
    if count < spec.min_models or (spec.max_models is not None and count > spec.max_models):
        wanted = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                  else f"at least {spec.min_models}")
        raise ValueError(f"{spec.name} merges {wanted} model(s) besides the base, got {count}")


def check_param_names(spec: Method, names) -> None:
    unknown = sorted(set(names) - set(spec.params))
    if unknown:
        raise ValueError(f"{spec.name} has no parameter {unknown[0]!r}; allowed: "
                         f"{', '.join(spec.params)}")


def complete_params(spec: Method, params: dict, count: int) -> dict:
    """``params`` with defaults filled in; unknown or missing parameters and per-model lists
    of the wrong length are one-line errors that list the allowed names."""
    check_param_names(spec, params)
    done = {}
    for name, param in spec.params.items():
        value = params.get(name, param.default)
        if value is REQUIRED:
            raise ValueError(f"{spec.name} needs parameter {name!r}")
        if param.scope == PER_MODEL:
            value = list(value) if isinstance(value, (list, tuple)) else [value] * count
            if len(value) != count:
                raise ValueError(f"{spec.name} parameter {name!r} has {len(value)} values for "
                                 f"{count} models")
            if REQUIRED in value:
                raise ValueError(f"{spec.name} needs parameter {name!r} for model "
                                 f"{value.index(REQUIRED)}")
        done[name] = value
    return done


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The generator for one tensor's random drops: the same for a name and seed whatever order
    tensors are merged in, or which process merges them."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def merge_tensor(name: str, tensors: Sequence[np.ndarray], base: np.ndarray | None,
                 params: dict, *, seed: int = 0, tensor_name: str = "",
                 stats: Whole = WHOLE, consume: bool = False) -> np.ndarray:
    """Merge one tensor of every model (``tensors`` excludes the base) by method ``name``.

    ``params`` holds shared values as scalars and per-model values as lists (a scalar is used
    for every model). Inputs are cast to a float compute dtype (float64 stays float64); the
    result keeps it, and callers cast to the output dtype. ``tensors`` may be one piece of a
    sharded tensor, with ``stats`` computing whole-tensor statistics across the pieces (and
    ``tensor_name`` naming the piece, so each draws its own random drops). With ``consume``
    the caller hands the arrays over and the merge may overwrite them, to save memory.
    """
    spec = method(name)
    check_inputs(spec, len(tensors), base is not None)
    params = complete_params(spec, params, len(tensors))
    dtype = _compute_dtype(tensors[0])
    tensors = [np.asarray(t).astype(dtype, copy=False) for t in tensors]
    if base is not None and spec.base != "ignored":
        base = np.asarray(base).astype(dtype, copy=False)
    else:
        base = None
    return spec.fn(tensors, base, params, tensor_rng(seed, tensor_name), stats, consume)
