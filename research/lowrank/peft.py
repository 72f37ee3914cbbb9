"""LoRA adapters in Hugging Face PEFT's on-disk format (``adapter_config.json`` +
``adapter_model.safetensors``), both ways.

PEFT stores, per adapted torch module ``M`` (names as ``transformers`` gives them),
``base_model.model.M.lora_A.weight [r, in]`` and ``lora_B.weight [out, r]``, or for an
embedding ``M.lora_embedding_A [r, vocab]`` and ``M.lora_embedding_B [embed, r]``; a DoRA
adapter (``use_dora``) adds ``M.lora_magnitude_vector [out]`` (our ``dora_m``, flattened); whole
modules that train beside the adapter (``modules_to_save``) are stored under their plain names.
Names and layouts come from :mod:`research.models.hf` (``FORMATS[family].hf_name`` and the
kernel's ``Layout``), so there is no second name map here: ``A`` (the kernel's input axes plus
the rank) converts with the kernel's own layout and ``B`` (rank plus output axes) with
``linear(1)``. Only JSON and safetensors are read.
"""

from __future__ import annotations

import collections
import json
import os
import re

import jax
import numpy as np
import safetensors.numpy

from research import files, tree
from research.lowrank import dora
from research.lowrank.lora import LoRA, TARGET_LEAVES, WEIGHT_INITS, factor_pairs, strip_factors
from research.models import hf

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"
_LORA_KEY = re.compile(r"(.*)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                       rf"|{MAGNITUDE})")


def _hf_shape(layout: hf.Layout, shape: tuple) -> tuple:
    return tuple(jax.eval_shape(layout.to_hf, jax.ShapeDtypeStruct(shape, np.float32)).shape)


def _module_name(tensor_name: str, path: str) -> str:
    if not tensor_name.endswith(".weight"):
        raise ValueError(f"{path} is stored as {tensor_name!r}, not a module's weight")
    return tensor_name[: -len(".weight")]


def _most_common(values: dict):
    counts = collections.Counter(values.values())
    return max(counts, key=lambda v: (counts[v], v))


def _pattern(module: str) -> str:
    # PEFT matches rank/alpha pattern keys as regexes against module names (suffix match).
    return re.escape(module)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first key matching a suffix of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _short_targets(targets: set[str], candidates: set[str]) -> list[str]:
    """PEFT's ``target_modules`` list: last name components when they select exactly
    ``targets`` among ``candidates``; the full module names otherwise."""
    suffixes = {name.rpartition(".")[2] for name in targets}
    if {name for name in candidates if name.rpartition(".")[2] in suffixes} == targets:
        return sorted(suffixes)
    return sorted(targets)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_peft(method: LoRA, params, model, directory: str, *,
                base_model_name_or_path: str | None = None) -> dict:
    """Write ``params``' LoRA factors (with DoRA's magnitudes, if any, and the ``also_train``
    modules, as PEFT's ``modules_to_save``) as a PEFT adapter for ``model``'s ``transformers``
    class. Returns the adapter config written."""
    if method.init_weights in WEIGHT_INITS:
        raise ValueError(f"export_peft: a LoRA with init_weights={method.init_weights!r} lives "
                         f"on residual base kernels; convert it first with "
                         f"lora.to_plain_lora(method, params, initial_factors)")
    flat = tree.flatten(params)
    pairs = factor_pairs(flat)
    if not pairs:
        raise ValueError("export_peft: params hold no LoRA factors")
    use_dora = {dora.magnitude_path(path) in flat for path in pairs}
    if len(use_dora) > 1:
        raise ValueError("export_peft: some adapted leaves have DoRA magnitudes and some do "
                         "not; PEFT's use_dora covers every module")
    use_dora = use_dora.pop()
    base = dora.strip_magnitudes(strip_factors(flat))
    tree.check_same_structure(model.param_shapes(), tree.unflatten(base))
    fmt = hf.FORMATS[model.family]
    _, prefixed = fmt.architecture(model.head)
    prefix = fmt.prefix if prefixed else ""
    alphas = tree.resolve_rules(method.alpha_rules, list(pairs), default=method.alpha,
                                what="LoRA alpha rule")

    tensors, ranks, module_alphas = {}, {}, {}
    for path, pair in pairs.items():
        name, layout = fmt.hf_name(path, prefix)
        module = _module_name(name, path)
        a, b = np.asarray(flat[pair.a], np.float32), np.asarray(flat[pair.b], np.float32)
        rank = a.shape[-1]
        if pair.embedding:
            tensors[f"{KEY_PREFIX}{module}.lora_embedding_A"] = a.T
            tensors[f"{KEY_PREFIX}{module}.lora_embedding_B"] = b.T
        else:
            out_size, in_size = _hf_shape(layout, tuple(flat[path].shape))
            a_hf, b_hf = layout.to_hf(a), hf.linear(1).to_hf(b)
            if a_hf.shape != (rank, in_size) or b_hf.shape != (out_size, rank):
                raise ValueError(f"export_peft: {path} {tuple(flat[path].shape)} is not a "
                                 f"torch Linear [{out_size}, {in_size}] PEFT can adapt")
            tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a_hf
            tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b_hf
            if use_dora:
                magnitude = flat[dora.magnitude_path(path)]
                tensors[f"{KEY_PREFIX}{module}.{MAGNITUDE}"] = np.asarray(
                    magnitude, np.float32).reshape(-1)
        ranks[module], module_alphas[module] = int(rank), float(alphas[path])

    # Modules trained beside the adapter travel whole, as PEFT's modules_to_save.
    also = tree.resolve_rules([(p, True) for p in method.also_train], list(base),
                              default=False, require_match=False)
    saved_modules = set()
    for path in (p for p, chosen in also.items() if chosen):
        name, layout = fmt.hf_name(path, prefix)
        module = name.rpartition(".")[0]
        if module in ranks:
            raise ValueError(f"export_peft: {path} trains whole and carries LoRA factors; "
                             f"PEFT cannot hold both for module {module!r}")
        saved_modules.add(module)
    for path in base:
        name, layout = fmt.hf_name(path, prefix)
        if name.rpartition(".")[0] in saved_modules:
            tensors[KEY_PREFIX + name] = layout.to_hf(np.asarray(base[path], np.float32))

    candidates = set()
    for path, value in base.items():
        if path.rpartition(tree.SEP)[2] in TARGET_LEAVES:
            name, _ = fmt.hf_name(path, prefix)
            if name.endswith(".weight"):
                candidates.add(name[: -len(".weight")])
    rank, alpha = _most_common(ranks), _most_common(module_alphas)
    config = {
        "peft_type": "LORA", "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": float(method.dropout),
        "target_modules": _short_targets(set(ranks), candidates - saved_modules),
        "rank_pattern": {_pattern(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {_pattern(m): a for m, a in module_alphas.items() if a != alpha},
        "use_rslora": bool(method.rslora), "modules_to_save": sorted(saved_modules) or None,
        "bias": "none", "fan_in_fan_out": False, "use_dora": use_dora, "init_lora_weights": True,
        "inference_mode": True, "revision": None,
    }
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    def write_config(path):
        with open(path, "w") as file:
            json.dump(config, file, indent=2, sort_keys=True)
    files.write_atomically(directory, {
        ADAPTER_WEIGHTS: lambda path: safetensors.numpy.save_file(
            tensors, path, metadata={"format": "pt"}),
        ADAPTER_CONFIG: write_config,
    })
    return config


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def _read_adapter(directory: str) -> tuple[dict, str, dict]:
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
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type={config.get('peft_type')!r}; only LORA "
                         f"adapters import")
    for key, plain in (("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False)):
        if config.get(key, plain) != plain:
            raise ValueError(f"{config_path}: {key}={config[key]!r} is not supported "
                             f"(only {plain!r})")
    if config.get("target_parameters") or config.get("trainable_token_indices"):
        raise ValueError(f"{config_path}: target_parameters / trainable_token_indices are "
                         f"not supported")
    return config, weights_path, safetensors.numpy.load_file(weights_path)


def _rules(values: dict[str, object]) -> tuple:
    """One exact-path rule per distinct value: ``("a|b|c", value)``."""
    groups = collections.defaultdict(list)
    for path, value in values.items():
        groups[value].append(re.escape(path))
    return tuple(("|".join(paths), value) for value, paths in groups.items())


def import_peft(directory: str, model, params, **options) -> tuple[LoRA, dict]:
    """``(LoRA method, params with factors)`` from a PEFT LoRA adapter for ``model`` (a
    :class:`~research.lowrank.dora.DoRA` method, with magnitudes, for ``use_dora``).
    ``params`` are the base weights (factors already in them are replaced); ``modules_to_save``
    weights replace theirs and train (``also_train``). ``options`` go to :class:`LoRA`
    (``dropout``, ``init_weights``...). An adapter that does not fit the model is a one-line error
    naming the module and both shapes."""
    config, weights_path, tensors = _read_adapter(directory)
    use_dora = bool(config.get("use_dora", False))
    fmt = hf.FORMATS[model.family]
    flat = dora.strip_magnitudes(strip_factors(tree.flatten(params)))
    tree.check_same_structure(model.param_shapes(), tree.unflatten(flat))

    names = {}
    for key in tensors:
        if not key.startswith(KEY_PREFIX):
            raise ValueError(f"{weights_path}: tensor {key!r} does not start with {KEY_PREFIX!r}")
        names[key] = key[len(KEY_PREFIX):]
    prefix = fmt.prefix if any(n.startswith(fmt.prefix) for n in names.values()) else ""
    by_tensor = {}
    for path in flat:
        name, layout = fmt.hf_name(path, prefix)
        by_tensor[name] = (path, layout)
    by_module = {name[: -len(".weight")]: entry for name, entry in by_tensor.items()
                 if name.endswith(".weight") and entry[0].rpartition(tree.SEP)[2] in TARGET_LEAVES}

    lora, saved = collections.defaultdict(dict), {}
    for key, name in names.items():
        match = _LORA_KEY.fullmatch(name)
        if match:
            lora[match.group(1)][match.group(2)] = tensors[key]
        elif name in by_tensor:
            saved[name] = tensors[key]
        else:
            near = ", ".join(tree.closest_paths(name, by_tensor))
            raise ValueError(f"{weights_path}: tensor {key!r} has no counterpart in this "
                             f"{model.family} model; closest: {near}")

    ranks, alphas, factors_hf = {}, {}, {}
    for module, parts in lora.items():
        if module not in by_module:
            near = ", ".join(tree.closest_paths(module, by_module))
            raise ValueError(f"{weights_path}: adapter module {module!r} has no counterpart "
                             f"in this {model.family} model; closest: {near}")
        path, layout = by_module[module]
        shape = tuple(flat[path].shape)
        embedding = path.endswith("embedding")
        kinds = (("lora_embedding_A", "lora_embedding_B") if embedding
                 else ("lora_A.weight", "lora_B.weight"))
        if use_dora:
            if embedding:
                raise ValueError(f"{weights_path}: DoRA on embedding {module!r} is not "
                                 f"supported")
            kinds += (MAGNITUDE,)
        if set(parts) != set(kinds):
            raise ValueError(f"{weights_path}: adapter module {module!r} has {sorted(parts)}; "
                             f"{path} {shape} needs {list(kinds)}")
        a, b = parts[kinds[0]], parts[kinds[1]]
        rank = a.shape[0]
        out_size, in_size = (shape[1], shape[0]) if embedding else _hf_shape(layout, shape)
        want_a, want_b = (rank, in_size), (out_size, rank)
        if a.ndim != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"{weights_path}: adapter module {module!r}: {kinds[0]} {tuple(a.shape)} and "
                f"{kinds[1]} {tuple(b.shape)} do not fit this model's {path} {shape}, which "
                f"needs {want_a} and {want_b}")
        if use_dora and tuple(parts[MAGNITUDE].shape) != (out_size,):
            raise ValueError(f"{weights_path}: adapter module {module!r}: {MAGNITUDE} "
                             f"{tuple(parts[MAGNITUDE].shape)} does not fit this model's "
                             f"{path} {shape}, which needs ({out_size},)")
        ranks[path] = int(rank)
        alphas[path] = float(_pattern_value(config.get("alpha_pattern"), module,
                                            config.get("lora_alpha", 8)))
        factors_hf[path] = (a, b, layout, embedding, parts.get(MAGNITUDE))

    if not ranks:
        raise ValueError(f"{weights_path}: the adapter holds no LoRA factors")
    alpha = _most_common(alphas)
    method = (dora.DoRA if use_dora else LoRA)(
        targets=_rules(ranks), alpha=alpha,
        alpha_rules=_rules({p: a for p, a in alphas.items() if a != alpha}),
        rslora=bool(config.get("use_rslora", False)),
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        also_train=tuple(re.escape(by_tensor[name][0]) for name in saved), **options)

    plan = method.plan(tree.unflatten(flat))
    for path, target in plan.items():
        a, b, layout, embedding, magnitude = factors_hf[path]
        n_in, rank = target.input_axes, target.rank
        a_shape, b_shape = (*target.shape[:n_in], rank), (rank, *target.shape[n_in:])
        module = path.rpartition(tree.SEP)[0]
        if embedding:
            a_ours, b_ours = a.T, b.T
        else:
            a_ours, b_ours = layout.to_ours(a, a_shape), hf.linear(1).to_ours(b, b_shape)
        flat[f"{module}/lora_a"] = np.asarray(a_ours, np.float32)
        flat[f"{module}/lora_b"] = np.asarray(b_ours, np.float32)
        if magnitude is not None:
            flat[dora.magnitude_path(path)] = np.asarray(
                magnitude.reshape(target.shape[n_in:]), np.float32)
    for name, value in saved.items():
        path, layout = by_tensor[name]
        shape = tuple(flat[path].shape)
        want = _hf_shape(layout, shape)
        if tuple(value.shape) != want:
            raise ValueError(f"{weights_path}: module tensor {name!r} {tuple(value.shape)} does "
                             f"not fit this model's {path} {shape}, which needs {want}")
        flat[path] = np.asarray(layout.to_ours(value, shape), np.float32)
    return method, jax.tree.map(jax.numpy.asarray, tree.unflatten(flat))
