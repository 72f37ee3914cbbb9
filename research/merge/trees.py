"""Merging whole parameter trees: every method of :mod:`research.merge.kernels`, leaf by leaf,
with per-path parameters.

A parameter's setting is a value, a list of numbers (a mergekit "gradient": interpolated over
the depth of the leaf's layer, first value at the first layer, last at the last), or ordered
``(regex, setting)`` rules over path names (first full match wins; a rule that matches no
path is an error). Per-model settings take precedence over shared ones, then the method's
defaults apply:

    merged = trees.merge("ties", [math_model, code_model], base,
                         model_parameters=[{"weight": 1.0, "density": 0.5},
                                           {"weight": [0.3, 1.0], "density": 0.5}],
                         parameters={"lambda": [(r".*/attn/.*", 1.2), (r".*", 1.0)]})
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from research import tree
from research.merge import kernels

_UNSET = object()
_LAYER = re.compile(r"(?:^|[/.])(?:layers?|h|blocks?)[_./]?(\d+)(?=[/.]|$)")


def layer_depths(paths: Sequence[str]) -> dict[str, float]:
    """Each path's depth ``t`` in [0, 1]: its layer index over the last one, as mergekit
    interpolates gradients; leaves outside the layers (embeddings, heads) get 0, as in
    mergekit."""
    index = {p: int(m.group(1)) for p in paths if (m := _LAYER.search(p))}
    last = max(index.values(), default=0)
    return {p: (index[p] / last if last and p in index else 0.0) for p in paths}


def interpolate(values: Sequence[float], t: float) -> float:
    """mergekit's gradient: piecewise-linear over evenly spaced anchors."""
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    return (1 - (scaled - low)) * values[low] + (scaled - low) * values[high]


def _is_rules(setting) -> bool:
    return (isinstance(setting, (list, tuple)) and bool(setting)
            and all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str)
                    for r in setting))


def resolve_setting(setting, paths: Sequence[str], depths: dict[str, float], *, what: str):
    """``{path: value}`` of one setting (None where rules leave a path unset)."""
    if _is_rules(setting):
        chosen = tree.resolve_rules(setting, paths, default=_UNSET, what=f"{what} rule")
        resolved = {p: None for p in paths}
        for value in {id(v): v for v in chosen.values() if v is not _UNSET}.values():
            group = [p for p in paths if chosen[p] is value]
            resolved.update(resolve_setting(value, group, depths, what=what))
        return resolved
    if isinstance(setting, (list, tuple)):
        if not setting or not all(isinstance(v, (int, float)) for v in setting):
            raise ValueError(f"{what}: a list must be numbers (a gradient over layers) or "
                             f"(regex, value) rules, got {setting!r}")
        return {p: interpolate(setting, depths[p]) for p in paths}
    return {p: setting for p in paths}


def is_float_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)  # numpy's issubdtype misses bfloat16


def _is_float(leaf) -> bool:
    return is_float_dtype(np.asarray(leaf).dtype)


def check_finite(flat: dict, model: str) -> None:
    for path, leaf in flat.items():
        if _is_float(leaf) and not np.isfinite(leaf).all():
            raise ValueError(f"{model} has NaN or Inf in {path}")


def resolve_params(method: str, paths: Sequence[str], parameters: dict | None,
                   model_parameters: Sequence[dict]) -> dict[str, dict]:
    """Each path's parameters for :func:`kernels.merge_tensor`: per-model settings first, then
    shared ones; unset parameters are left to the method's defaults."""
    spec = kernels.method(method)
    parameters = parameters or {}
    names = {*parameters, *(k for mp in model_parameters for k in mp)}
    kernels.check_param_names(spec, names)
    for index, own in enumerate(model_parameters):
        shared = [n for n in own if spec.params[n].scope == kernels.SHARED]
        if shared:
            raise ValueError(f"model {index}: {method} parameter {shared[0]!r} is shared by "
                             "all models; set it in parameters")
    depths = layer_depths(paths)
    unset = {p: None for p in paths}
    resolved = {p: {} for p in paths}
    for name in names:
        shared = (resolve_setting(parameters[name], paths, depths, what=name)
                  if name in parameters else unset)
        own = [resolve_setting(mp[name], paths, depths, what=f"model {i} {name}")
               if name in mp else unset for i, mp in enumerate(model_parameters)]
        for path in paths:
            if spec.params[name].scope == kernels.PER_MODEL:
                values = [o[path] if o[path] is not None else shared[path] for o in own]
                if any(v is not None for v in values):
                    default = spec.params[name].default
                    resolved[path][name] = [default if v is None else v for v in values]
            elif shared[path] is not None:
                resolved[path][name] = shared[path]
    return resolved


def check_call(method: str, count: int, has_base: bool,
               model_parameters: Sequence[dict] | None) -> list[dict]:
    """The method exists and takes ``count`` models (and a base, or not); one settings dict per
    model (empty ones when none are given)."""
    kernels.check_inputs(kernels.method(method), count, has_base)
    model_parameters = list(model_parameters or [{} for _ in range(count)])
    if len(model_parameters) != count:
        raise ValueError(f"model_parameters has {len(model_parameters)} entries for {count} "
                         "models")
    return model_parameters


def merge(method: str, models: Sequence[dict], base: dict | None = None, *,
          parameters: dict | None = None, model_parameters: Sequence[dict] | None = None,
          seed: int = 0) -> dict:
    """Merge ``models`` (and ``base``, for methods that use one) by ``method``.

    Leaves that are not floating point (step counters, position ids) are copied from the base,
    or the first model. Structures and shapes must agree: the error names the first path that
    does not.
    """
    model_parameters = check_call(method, len(models), base is not None, model_parameters)
    reference = base if base is not None else models[0]
    for other in models:
        tree.check_same_structure(reference, other)
    flats = [tree.flatten(m) for m in models]
    flat_base = tree.flatten(base) if base is not None else None
    for index, flat in enumerate(flats):
        check_finite(flat, f"model {index}")
    if flat_base is not None:
        check_finite(flat_base, "the base model")

    params_by_path = resolve_params(method, list(flats[0]), parameters, model_parameters)
    merged = {}
    for path in flats[0]:
        first = np.asarray(flats[0][path])
        if not _is_float(first):
            merged[path] = (flat_base or flats[0])[path]
            continue
        params = params_by_path[path]
        try:
            result = kernels.merge_tensor(
                method, [np.asarray(f[path]) for f in flats],
                None if flat_base is None else np.asarray(flat_base[path]), params,
                seed=seed, tensor_name=path)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        merged[path] = jnp.asarray(result, dtype=first.dtype)
    return tree.unflatten(merged)


def task_vector(finetuned: dict, base: dict) -> dict:
    """``finetuned - base``: what fine-tuning added (Ilharco et al. 2023)."""
    return tree.sub(finetuned, base)


def apply_task_vectors(base: dict, vectors: Sequence[dict], scale: float = 1.0) -> dict:
    """``base + scale * sum(vectors)``; a negative scale forgets the tasks. Leaves that are not
    floating point (position ids) stay the base's."""
    total = vectors[0]
    for vector in vectors[1:]:
        total = tree.add(total, vector)
    moved = tree.flatten(tree.add(base, tree.scale(total, scale)))
    return tree.unflatten({path: (moved[path] if _is_float(leaf) else leaf)
                           for path, leaf in tree.flatten(base).items()})
