"""mergekit YAML configs run on Hugging Face safetensors checkpoints, out of core.

A config written for mergekit (Goddard et al. 2024, "Arcee's MergeKit") — ``models`` or
``slices``, ``base_model``, ``merge_method``, ``parameters`` (scalars, layer gradients,
``filter``/``value`` conditions), ``dtype``, ``out_dtype`` — means the same here: the plan
names, for every output tensor, its source tensors and resolved parameters; the merge then
streams them one tensor at a time (:mod:`research.merge.stream`), merges with
:mod:`research.merge.kernels` and writes the checkpoint atomically. Peak memory is about
(models + 2) tensors; the YAML is read with a safe loader and only safetensors are loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

import ml_dtypes
import numpy as np
import yaml

from research.merge import kernels, stream, trees

KEYS = ("models", "slices", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
        "tokenizer_source")
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
          "float64": np.float64}
# Files copied beside the weights (from the base model, else the first).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "tokenizer.model", "merges.txt", "vocab.json", "generation_config.json",
              "preprocessor_config.json")
READ_AHEAD = 4  # tensors read while the merge works: a base and three models' next inputs
# ``model.layers.3.mlp...`` (Llama), ``encoder.layer.3.attention...`` (BERT, ViT).
_LAYER = re.compile(r"^(?P<head>.*?(?:^|\.)(?:layers|layer|h|blocks)\.)(?P<index>\d+)"
                    r"(?P<tail>\..*)$")


@dataclasses.dataclass
class TensorPlan:
    """One output tensor: where its inputs come from and the parameters it merges with."""
    name: str
    sources: list[tuple[str, str]]  # (model directory, tensor name), non-base inputs
    base: tuple[str, str] | None
    params: dict
    shape: tuple
    dtype: np.dtype


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def load(path: str) -> dict:
    """The YAML config at ``path``, checked for keys this runner understands."""
    try:
        with open(path) as file:
            config = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the merge config: {err}".splitlines()[0]) from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a merge config is a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise ValueError(f"{path}: unsupported key {unknown[0]!r}; supported: {', '.join(KEYS)}")
    if ("models" in config) == ("slices" in config):
        raise ValueError(f"{path}: give exactly one of 'models' or 'slices'")
    if "merge_method" not in config:
        raise ValueError(f"{path}: 'merge_method' is missing; allowed: "
                         f"{', '.join(kernels.METHODS)}")
    kernels.method(config["merge_method"])
    for key in ("dtype", "out_dtype"):
        if config.get(key) is not None and config[key] not in DTYPES:
            raise ValueError(f"{path}: {key} {config[key]!r} is not one of {', '.join(DTYPES)}")
    return config


def evaluate(setting, tensor_name: str, t: float, used_filters: set):
    """mergekit's ``evaluate_setting``: conditions ``{filter, value}`` (first whose filter is a
    substring of the tensor name, or absent, or ``*``), gradients over layer depth ``t``, or a
    plain value; None when no condition applies."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(s, dict) for s in setting):
        for condition in setting:
            if set(condition) - {"filter", "value"} or "value" not in condition:
                raise ValueError(f"a parameter condition has keys filter and value, got "
                                 f"{sorted(condition)}")
            pattern = condition.get("filter")
            if pattern in (None, "*") or pattern in tensor_name:
                used_filters.add(pattern)
                return evaluate(condition["value"], tensor_name, t, used_filters)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        return (1 - (scaled - low)) * setting[low] + (scaled - low) * setting[high]
    return setting


def _filters(setting) -> list[str]:
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        return [c.get("filter") for c in setting if isinstance(c, dict)
                if c.get("filter") not in (None, "*")]
    return []


def _model_dir(reference, where: str) -> str:
    if isinstance(reference, dict):
        reference = reference.get("model")
    if not isinstance(reference, str) or "+" in reference:
        raise ValueError(f"{where}: a model is a local checkpoint directory, got {reference!r}"
                         " (LoRA '+' references are not supported)")
    if not os.path.isdir(reference):
        raise ValueError(f"{where}: {reference} is not a directory (models are read from local "
                         "Hugging Face checkpoints; nothing is downloaded)")
    return os.path.normpath(reference)


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


def _layer_of(name: str) -> tuple[str, int, str] | None:
    match = _LAYER.match(name)
    return (match["head"], int(match["index"]), match["tail"]) if match else None


def _layer_count(checkpoint: stream.Checkpoint) -> int:
    indices = [layer[1] for n in checkpoint.names if (layer := _layer_of(n))]
    return max(indices) + 1 if indices else 0


def _check_same_tensors(reference: stream.Checkpoint, other: stream.Checkpoint) -> None:
    for name in reference.names:
        if name not in other.names:
            raise ValueError(f"{other.directory} has no tensor {name!r} (in "
                             f"{reference.directory}): the models differ in architecture")
        if other.shape(name) != reference.shape(name):
            raise ValueError(f"{name}: shape {list(other.shape(name))} in {other.directory} but "
                             f"{list(reference.shape(name))} in {reference.directory}")
    extra = [n for n in other.names if n not in reference.names]
    if extra:
        raise ValueError(f"{other.directory} has tensor {extra[0]!r} that {reference.directory} "
                         "lacks: the models differ in architecture")


def plan(config: dict, checkpoints: dict[str, stream.Checkpoint]) -> tuple[list[TensorPlan], int]:
    """Every output tensor, in write order, and the output's layer count."""
    spec = kernels.method(config["merge_method"])
    base_dir = _model_dir(config["base_model"], "base_model") if config.get("base_model") \
        else None
    if config.get("models") is not None:
        entries = config["models"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("models: a non-empty list of {model, parameters} entries")
        directories = [_model_dir(e, f"models[{i}]") for i, e in enumerate(entries)]
        count = _layer_count(checkpoints[directories[0]])
        slices = [{"sources": [{"model": d, "layer_range": [0, count],
                                "parameters": (e.get("parameters") if isinstance(e, dict)
                                               else None)}
                               for d, e in zip(directories, entries)]}]
    else:
        slices = config["slices"]
        if not isinstance(slices, list) or not slices:
            raise ValueError("slices: a non-empty list of {sources: [...]} entries")
    global_params = config.get("parameters") or {}

    used_filters: set = set()
    tensors: list[TensorPlan] = []

    def add(out_name, sources, slice_def, slice_base, t):
        """Plan one output tensor from ``sources`` = [(directory, input name, source params)]."""
        base = None
        inputs = sources
        if spec.base != "ignored" and slice_base is not None:
            base_name = next((n for d, n, _ in sources if d == slice_base), sources[0][1])
            base = (slice_base, base_name)
            inputs = [s for s in sources if s[0] != slice_base]
        kernels.check_inputs(spec, len(inputs), base is not None)
        params = {}
        for key, param in spec.params.items():
            def resolve(level_settings):
                for settings in level_settings:
                    if settings and key in settings:
                        value = evaluate(settings[key], out_name, t, used_filters)
                        if value is not None:
                            return value
                return None
            levels = [slice_def.get("parameters"), global_params]
            if param.scope == kernels.PER_MODEL:
                values = [resolve([source_params, *levels]) for _, _, source_params in inputs]
                if any(v is not None for v in values):
                    params[key] = [param.default if v is None else v for v in values]
            else:
                value = resolve(levels)
                if value is not None:
                    params[key] = value
        first = checkpoints[(base or inputs[0])[0]]
        name = (base or inputs[0])[1]
        tensors.append(TensorPlan(out_name, [(d, n) for d, n, _ in inputs], base, params,
                                  first.shape(name), first.dtype(name)))

    out_layer = 0
    layer_tensors = []
    for s_index, slice_def in enumerate(slices):
        sources = slice_def.get("sources") or []
        if not sources:
            raise ValueError(f"slices[{s_index}]: 'sources' is empty")
        slice_base = (_model_dir(slice_def["base_model"], f"slices[{s_index}].base_model")
                      if slice_def.get("base_model") else base_dir)
        ranges = []
        for i, source in enumerate(sources):
            where = f"slices[{s_index}].sources[{i}]"
            directory = _model_dir(source, where)
            start, stop = source.get("layer_range", (None, None))
            count = _layer_count(checkpoints[directory])
            if not (isinstance(start, int) and isinstance(stop, int)
                    and 0 <= start < stop <= count):
                raise ValueError(f"{where}.layer_range {source.get('layer_range')!r} is not "
                                 f"within the model's {count} layers")
            ranges.append((directory, start, stop, source.get("parameters")))
        lengths = {stop - start for _, start, stop, _ in ranges}
        if len(lengths) != 1:
            raise ValueError(f"slices[{s_index}]: every source must span the same number of "
                             f"layers, got {sorted(lengths)}")
        length = lengths.pop()
        if slice_base is not None and spec.base != "ignored" and \
                slice_base not in [d for d, *_ in ranges]:
            ranges.append((slice_base, ranges[0][1], ranges[0][2], None))
        reference = checkpoints[ranges[0][0]]
        names_by_layer = {}
        for name in reference.names:
            if (layer := _layer_of(name)) is not None:
                names_by_layer.setdefault(layer[1], []).append(layer)
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            for head, _, tail in names_by_layer.get(ranges[0][1] + offset, []):
                out_name = f"{head}{out_layer}{tail}"
                sources_here = [(d, f"{head}{start + offset}{tail}", p)
                                for d, start, _, p in ranges]
                layer_tensors.append((out_name, sources_here, slice_def, slice_base, t))
            out_layer += 1

    def outside(slice_def, which):
        """Embeddings (before the layers) come from the first slice, the rest from the last."""
        sources = [(_model_dir(s, "sources"), s.get("parameters")) for s in slice_def["sources"]]
        slice_base = (_model_dir(slice_def["base_model"], "base_model")
                      if slice_def.get("base_model") else base_dir)
        if slice_base is not None and spec.base != "ignored" and \
                slice_base not in [d for d, _ in sources]:
            sources.append((slice_base, None))
        reference = checkpoints[sources[0][0]]
        for name in reference.names:
            if _layer_of(name) is None and (("embed" in name) == (which == "pre")):
                add(name, [(d, name, p) for d, p in sources], slice_def, slice_base, 0.0)

    outside(slices[0], "pre")
    for entry in layer_tensors:
        add(*entry)
    outside(slices[-1], "post")

    levels = [global_params, *(s.get("parameters") or {} for s in slices),
              *(src.get("parameters") or {} for s in slices for src in s["sources"])]
    for level in levels:
        kernels.check_param_names(spec, level)
    for setting in (value for level in levels for value in level.values()):
        for pattern in _filters(setting):
            if pattern not in used_filters:
                raise ValueError(f"parameter filter {pattern!r} matches no tensor; e.g. "
                                 f"{', '.join(t.name for t in tensors[:3])}")
    return tensors, out_layer


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def _read_checked(checkpoint: stream.Checkpoint, name: str) -> np.ndarray:
    array = checkpoint.read(name)
    if trees.is_float_dtype(array.dtype):
        # One SIMD reduction instead of an elementwise mask: NaN and Inf survive a sum. A sum
        # that overflows is only a false alarm, which the exact check then clears.
        total = array.sum(dtype=np.float32 if array.itemsize < 4 else None)
        if not np.isfinite(total) and not np.isfinite(array).all():
            raise ValueError(f"{checkpoint.directory}: tensor {name!r} holds NaN or Inf")
    return array


def run(config_path: str, out_dir: str, *, seed: int = 0, max_shard_bytes: int = 5 * 10**9,
        durable: bool = True) -> list[TensorPlan]:
    """Merge as ``config_path`` says and write a Hugging Face checkpoint to ``out_dir``
    (atomically; ``durable`` also fsyncs it before publishing, see
    :class:`stream.CheckpointWriter`)."""
    config = load(config_path)
    references = [config.get("base_model")] if config.get("base_model") else []
    if config.get("models") is not None:
        references += list(config["models"])
    for s in config.get("slices") or []:
        references += list(s.get("sources") or [])
        if s.get("base_model"):
            references.append(s["base_model"])
    directories = list(dict.fromkeys(_model_dir(r, "models") for r in references))
    checkpoints = {d: stream.Checkpoint(d) for d in directories}
    try:
        if config.get("models") is not None:
            first = checkpoints[directories[0]]
            for other in directories[1:]:
                _check_same_tensors(first, checkpoints[other])
        tensors, layers = plan(config, checkpoints)
        return _execute(config, checkpoints, tensors, layers, out_dir, seed, max_shard_bytes,
                        durable)
    finally:
        for checkpoint in checkpoints.values():
            checkpoint.close()


def _execute(config, checkpoints, tensors, layers, out_dir, seed, max_shard_bytes, durable):
    method = config["merge_method"]
    out_dtype = config.get("out_dtype") or config.get("dtype")
    compute_dtype = np.float64 if config.get("dtype") == "float64" else np.float32

    def output_dtype(plan_entry):
        if out_dtype and trees.is_float_dtype(plan_entry.dtype):
            return np.dtype(DTYPES[out_dtype])
        return plan_entry.dtype

    specs = [(t.name, t.shape, output_dtype(t)) for t in tensors]
    source_dir = (tensors[0].base or tensors[0].sources[0])[0]
    hf_config = dict(checkpoints[source_dir].config or {})
    if "num_hidden_layers" in hf_config:
        hf_config["num_hidden_layers"] = layers
    if out_dtype:
        hf_config["torch_dtype"] = hf_config["dtype"] = out_dtype
    extra = {stream.CONFIG_FILE: hf_config} if hf_config else {}
    for name in SIDE_FILES:
        path = os.path.join(source_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as file:
                extra[name] = file.read()

    def reads():
        """One read per input tensor, inputs then base, in plan order, so the next tensor's
        inputs are read while this one merges (``READ_AHEAD`` more tensors in memory)."""
        for entry in tensors:
            for directory, name in entry.sources + ([entry.base] if entry.base else []):
                yield lambda d=directory, n=name: _read_checked(checkpoints[d], n)

    with contextlib.closing(stream.read_ahead(reads(), depth=READ_AHEAD)) as arrays, \
            stream.CheckpointWriter(out_dir, specs, max_shard_bytes=max_shard_bytes,
                                    durable=durable) as writer:
        for entry in tensors:
            inputs = [next(arrays) for _ in entry.sources]
            base = next(arrays) if entry.base else None
            dtype = output_dtype(entry)
            if not trees.is_float_dtype(inputs[0].dtype):
                merged = base if base is not None else inputs[0]
            else:
                inputs = [x.astype(compute_dtype, copy=False) for x in inputs]
                base = None if base is None else base.astype(compute_dtype, copy=False)
                try:
                    merged = kernels.merge_tensor(method, inputs, base, entry.params, seed=seed,
                                                  tensor_name=entry.name, consume=True)
                except ValueError as err:
                    raise ValueError(f"{entry.name}: {err}") from None
            del inputs, base
            writer.write(entry.name, merged.astype(dtype, copy=False))
            del merged
        writer.commit(extra)
    return tensors

