"""PEFT's adapter format shared by every family: the pieces each method's exporter and importer
(:mod:`research.lowrank.peft`, :mod:`research.lowrank.adalora`, :mod:`research.lowrank.vera`,
:mod:`research.lowrank.lycoris`, :mod:`research.adapters.ia3`, :mod:`research.adapters.prompts`,
:mod:`research.sparse.ln_peft`) would otherwise repeat.

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``. A
tuner stores, per adapted torch module ``M`` (named as ``transformers`` names it),
``base_model.model.M.<part>``; whole modules that train beside the adapter (``modules_to_save``)
sit under their plain names, in torch's layout. Names and layouts come from
:mod:`research.models.hf` (``FORMATS[family].hf_name`` and the tensor's ``Layout``), so there is
no second name map here. Only JSON and safetensors are read; the folder is written atomically
(:func:`research.files.write_atomically`).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Iterable
from typing import NamedTuple

import jax
import numpy as np
import safetensors.numpy

from research import files, tree
from research.models import hf

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # a tuner wraps the transformers model twice


# ---------------------------------------------------------------------------------------------
# Names and shapes
# ---------------------------------------------------------------------------------------------


def hf_names(model, paths: Iterable[str], *, prefixed: bool | None = None) -> dict:
    """``{our path: (HF tensor name, layout)}`` for ``model``'s ``transformers`` class: the
    trunk under the family's prefix when the head's class has one (or as ``prefixed`` says)."""
    fmt = hf.FORMATS[model.family]
    if prefixed is None:
        _, prefixed = fmt.architecture(model.head)
    prefix = fmt.prefix if prefixed else ""
    return {path: fmt.hf_name(path, prefix) for path in paths}


def hf_shape(layout: hf.Layout, shape: tuple) -> tuple:
    """The shape torch stores a tensor of our ``shape`` in."""
    return tuple(jax.eval_shape(layout.to_hf, jax.ShapeDtypeStruct(shape, np.float32)).shape)


def module_name(tensor_name: str) -> str:
    """The torch module holding a tensor: ``a.b.weight`` -> ``a.b``."""
    return tensor_name.rpartition(".")[0]


def weight_module(tensor_name: str, path: str) -> str:
    """The torch module whose ``weight`` our ``path`` is stored as."""
    if not tensor_name.endswith(".weight"):
        raise ValueError(f"{path} is stored as {tensor_name!r}, not a module's weight")
    return tensor_name[: -len(".weight")]


def adaptable_modules(names: dict, leaves: Iterable[str] = ("kernel",)) -> dict[str, str]:
    """``{torch module: our path}`` for the paths in ``names`` (``hf_names``' map) whose leaf
    is one of ``leaves`` and which torch stores as a module's weight."""
    leaves = set(leaves)
    return {name[: -len(".weight")]: path for path, (name, _) in names.items()
            if name.endswith(".weight") and path.rpartition(tree.SEP)[2] in leaves}


def check_linear(what: str, path: str, shape: tuple, layout: hf.Layout,
                 input_axes: int) -> None:
    """Our kernel ``path`` must be stored as a torch ``Linear [out, in]`` (the products of its
    output and input axes), which is what PEFT adapts; otherwise a one-line error."""
    fan_in, fan_out = math.prod(shape[:input_axes]), math.prod(shape[input_axes:])
    if hf_shape(layout, shape) != (fan_out, fan_in):
        raise ValueError(f"{what}: {path} {shape} is not a torch Linear [{fan_out}, {fan_in}] "
                         f"PEFT can adapt")


# ---------------------------------------------------------------------------------------------
# Config values: target_modules, rank / alpha patterns, rules back from them
# ---------------------------------------------------------------------------------------------


def target_modules(targets: set[str], candidates: set[str]) -> list[str]:
    """PEFT's ``target_modules`` list: last name components when they select exactly
    ``targets`` among ``candidates`` (PEFT matches a name or a ``.``-suffix); the full module
    names otherwise."""
    suffixes = {name.rpartition(".")[2] for name in targets}
    if {name for name in candidates if name.rpartition(".")[2] in suffixes} == targets:
        return sorted(suffixes)
    return sorted(targets)


def most_common(values: dict):
    """The value most keys hold (ties: the largest), PEFT's ``r`` / ``alpha`` beside patterns."""
    counts = collections.Counter(values.values())
    return max(counts, key=lambda v: (counts[v], v))


def pattern_key(module: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key for one module: PEFT matches the keys as
    regexes against a suffix of module names."""
    return re.escape(module)


def pattern_value(patterns: dict | None, module: str, default):
    """PEFT's ``get_pattern_key``: the value of the first key matching a suffix of the module
    name, ``default`` when none does."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def value_rules(values: dict[str, object]) -> tuple:
    """One exact-path rule per distinct value: ``("a|b|c", value)``."""
    groups = collections.defaultdict(list)
    for path, value in values.items():
        groups[value].append(re.escape(path))
    return tuple(("|".join(paths), value) for value, paths in groups.items())


def exact_rules(paths: Iterable[str]) -> tuple:
    """Regexes matching exactly ``paths`` (sorted), one each."""
    return tuple(re.escape(path) for path in sorted(paths))


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def modules_to_save(also_train: Iterable[str], flat: dict, names: dict,
                    adapted: Iterable[str] = (), *, what: str = "", carries: str = "",
                    key_prefix: str = KEY_PREFIX) -> tuple[list[str], dict]:
    """``(PEFT's modules_to_save, their tensors)``: every torch module holding a path that an
    ``also_train`` regex matches travels whole, in torch's layout. ``names`` is ``hf_names``'
    map over the model's params in ``flat``. A module among ``adapted`` cannot also be saved
    whole in PEFT: a one-line error (``what`` names the caller, ``carries`` the adapter)."""
    chosen = tree.resolve_rules([(p, True) for p in also_train], list(names), default=False,
                                require_match=False)
    adapted, saved = set(adapted), set()
    for path in (p for p, take in chosen.items() if take):
        module = module_name(names[path][0])
        if module in adapted:
            raise ValueError(f"{what}: {path} trains whole and carries {carries}; PEFT cannot "
                             f"hold both for module {module!r}")
        saved.add(module)
    tensors = {key_prefix + name: layout.to_hf(np.asarray(flat[path], np.float32))
               for path, (name, layout) in names.items() if module_name(name) in saved}
    return sorted(saved), tensors


def write_adapter(directory: str, config: dict, tensors: dict) -> None:
    """Write ``config`` and ``tensors`` as a PEFT adapter folder, atomically: a reader sees the
    old folder or the new one, never a mix."""
    tensors = {key: np.ascontiguousarray(value) for key, value in tensors.items()}

    def write_config(path):
        with open(path, "w") as file:
            json.dump(config, file, indent=2, sort_keys=True)
    files.write_atomically(directory, {
        ADAPTER_WEIGHTS: lambda path: safetensors.numpy.save_file(
            tensors, path, metadata={"format": "pt"}),
        ADAPTER_CONFIG: write_config,
    })


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


class Adapter(NamedTuple):
    """A PEFT adapter folder as read: its config, the two files' paths and the tensors."""
    config: dict
    config_path: str
    weights_path: str
    tensors: dict


def read_adapter(directory: str, peft_types: Iterable[str] | None = None,
                 plain: dict | None = None) -> Adapter:
    """The adapter in ``directory``. Both files must exist (a pickled ``adapter_model.bin``
    is never read); ``peft_type`` must be one of ``peft_types`` (unchecked when None); each key
    of ``plain`` must be absent or hold its value there (options Scion does not support)."""
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} does not exist")
    if not os.path.isfile(weights_path):
        pickled = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        raise FileNotFoundError(f"{weights_path} does not exist" + (
            " (adapter_model.bin is a pickle; it is not read)" if pickled else ""))
    with open(config_path) as file:
        config = json.load(file)
    if peft_types is not None and config.get("peft_type") not in tuple(peft_types):
        raise ValueError(f"{config_path}: peft_type={config.get('peft_type')!r}; only "
                         f"{' and '.join(map(repr, peft_types))} adapters import here")
    for key, value in (plain or {}).items():
        if config.get(key, value) != value:
            raise ValueError(f"{config_path}: {key}={config[key]!r} is not supported "
                             f"(only {value!r})")
    return Adapter(config, config_path, weights_path, safetensors.numpy.load_file(weights_path))


class SortedTensors(NamedTuple):
    """A tuner's tensors sorted against a model (see :func:`sort_tensors`)."""
    adapted: dict  # our kernel path -> (torch module, {part: tensor})
    saved: dict    # our path -> (the file's key, tensor): modules_to_save
    names: dict    # our path -> (HF tensor name, layout), the prefix the file uses


def sort_tensors(adapter: Adapter, model, flat: dict, parts: Iterable[str], *, holding: str,
                 leaves: Iterable[str] = ("kernel",)) -> SortedTensors:
    """Sort a tuner's tensors (``base_model.model.M.<part>``, ``part`` one of ``parts``) into
    adapter tensors per adapted module (one whose weight is a ``leaves`` path of ``flat``, the
    model's base params) and ``modules_to_save`` tensors. A tensor with no counterpart in the
    model, or an adapter with no part (``holding`` names what it should hold), is a one-line
    error naming it and the closest names."""
    weights_path, tensors = adapter.weights_path, adapter.tensors
    in_file = {}
    for key in tensors:
        if not key.startswith(KEY_PREFIX):
            raise ValueError(f"{weights_path}: tensor {key!r} does not start with {KEY_PREFIX!r}")
        in_file[key] = key[len(KEY_PREFIX):]
    prefix = hf.FORMATS[model.family].prefix
    names = hf_names(model, flat, prefixed=any(n.startswith(prefix) for n in in_file.values()))
    by_tensor = {name: path for path, (name, _) in names.items()}
    by_module = adaptable_modules(names, leaves)
    part_key = re.compile(rf"(.*)\.({'|'.join(map(re.escape, parts))})")

    adapted, saved = {}, {}
    for key, name in in_file.items():
        match = part_key.fullmatch(name)
        if match:
            module, part = match.groups()
            if module not in by_module:
                near = ", ".join(tree.closest_paths(module, by_module))
                raise ValueError(f"{weights_path}: adapter module {module!r} has no "
                                 f"counterpart in this {model.family} model; closest: {near}")
            adapted.setdefault(by_module[module], (module, {}))[1][part] = tensors[key]
        elif name in by_tensor:
            saved[by_tensor[name]] = (key, tensors[key])
        else:
            near = ", ".join(tree.closest_paths(name, by_tensor))
            raise ValueError(f"{weights_path}: tensor {key!r} has no counterpart in this "
                             f"{model.family} model; closest: {near}")
    if not adapted:
        raise ValueError(f"{weights_path}: the adapter holds no {holding}")
    return SortedTensors(adapted, saved, names)


def load_saved(saved: dict, names: dict, flat: dict, weights_path: str) -> dict:
    """``{our path: value in our layout}`` for ``saved`` (``{our path: (key, torch tensor)}``);
    a tensor whose shape does not fit ``flat``'s is a one-line error naming both."""
    loaded = {}
    for path, (key, value) in saved.items():
        layout, shape = names[path][1], tuple(flat[path].shape)
        want = hf_shape(layout, shape)
        if tuple(value.shape) != want:
            raise ValueError(f"{weights_path}: tensor {key!r} {tuple(value.shape)} does not fit "
                             f"this model's {path} {shape}, which needs {want}")
        loaded[path] = np.asarray(layout.to_ours(value, shape), np.float32)
    return loaded
