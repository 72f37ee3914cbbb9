"""IA³ (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): freeze the model and learn one vector per chosen layer that rescales its
activations elementwise.

As PEFT 0.21 does it: a chosen layer's *output* is scaled, bias included (``(x·W + b) * l``, the
attention keys and values), or, for a *feedforward* layer, its *input* (``(x * l)·W + b``, the
MLP output projection). :meth:`IA3.init` puts ``ia3_l`` beside each chosen kernel, all ones, so
the model is unchanged at step 0. Its shape is the kernel's output axes (key: ``[heads,
head_dim]``) or, for a feedforward layer, its input axes (``mlp/wo``: ``[mlp]``; the attention
output: ``[heads, head_dim]``); PEFT's ``[out, 1]`` and ``[1, in]`` are the same vectors
flattened. :meth:`IA3.export` folds each vector into its kernel (and the bias of an output-scaled
layer), so the plain model computes the same function.

:func:`export_ia3_peft` and :func:`import_ia3_peft` read and write PEFT's on-disk format
(``adapter_config.json`` + ``adapter_model.safetensors``, tensors
``base_model.model.M.ia3_l``), with names and layouts from :mod:`research.models.hf`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from research import files, sites, tree
from research.lowrank.lora import DEFAULT_INPUT_AXES
from research.methods import Applied, Method, register
from research.models import hf

L = "ia3_l"
VECTOR_PATTERN = rf"(.*/)?{L}"
# PEFT's defaults for BERT / ViT / Llama: keys, values and the MLP's output projection, the
# latter scaled on its input (the paper's l_ff sits after the MLP's nonlinearity).
DEFAULT_TARGETS = (r"(.*/)?attn/(key|value)/kernel", r"(.*/)?mlp/(wo|down)/kernel")
DEFAULT_FEEDFORWARD = (r"(.*/)?mlp/(wo|down)/kernel",)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
PEFT_TYPE = "IA3"


@dataclasses.dataclass(frozen=True)
class Target:
    """What :meth:`IA3.plan` decided for one kernel."""
    path: str
    feedforward: bool
    input_axes: int
    shape: tuple

    @property
    def vector(self) -> str:
        return sites.join(sites.parent(self.path), L)

    @property
    def vector_shape(self) -> tuple:
        return self.shape[:self.input_axes] if self.feedforward else self.shape[self.input_axes:]


def _rules(rules, what: str) -> tuple:
    """``(regex, chosen)`` rules from rules or bare regexes (lists from a config allowed)."""
    out = []
    for rule in rules or ():
        if isinstance(rule, str):
            out.append((rule, True))
        elif isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str):
            out.append((rule[0], bool(rule[1])))
        else:
            raise ValueError(f"IA3 {what} {rule!r} is neither a regex nor a (regex, bool) rule")
    return tuple(out)


def strip_vectors(flat: dict) -> dict:
    return {p: v for p, v in flat.items() if sites.leaf(p) != L}


@register("ia3")
@dataclasses.dataclass(frozen=True)
class IA3(Method):
    """IA³ options (``config.method = dict(name='ia3', ...)``).

    targets: regexes, or ordered ``(regex, bool)`` rules (first match wins, so an exclusion can
        precede a broad rule), over kernel paths; default keys, values and ``mlp/wo``.
    feedforward: regexes over the targets whose *input* is scaled (PEFT's
        ``feedforward_modules``); default ``mlp/wo``. Each given one must match a target.
    also_train: extra path regexes that train (a classifier head); ``trainable``, when given,
        replaces the default (the vectors plus ``also_train``).
    input_axes: ``(regex, n)`` rules saying how many leading kernel axes are inputs (default 1;
        the zoo's attention output has 2).
    """

    targets: tuple = DEFAULT_TARGETS
    feedforward: tuple | None = None
    also_train: tuple = ()
    input_axes: tuple = DEFAULT_INPUT_AXES

    adapter_leaves: ClassVar[tuple] = (VECTOR_PATTERN,)

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "targets", _rules(self.targets, "target"))
        if self.feedforward is not None:
            set_(self, "feedforward", _rules(self.feedforward, "feedforward rule"))
        set_(self, "also_train", tuple(self.also_train or ()))
        set_(self, "input_axes", tuple(tuple(r) if isinstance(r, list) else r
                                       for r in self.input_axes or ()))
        if not self.targets:
            raise ValueError("IA3 needs targets: regexes over kernel paths")
        set_(self, "trainable", (*self.adapter_leaves, *self.also_train)
             if self.trainable is None else tuple(self.trainable))

    def plan(self, params) -> dict[str, Target]:
        """``{kernel path: Target}`` for ``params`` (arrays or shapes). A target rule matching
        no kernel, or a feedforward rule matching no target, is a one-line error."""
        flat = strip_vectors(tree.flatten(params))
        kernels = [p for p in flat if sites.leaf(p) == "kernel"]
        chosen = tree.resolve_rules(self.targets, kernels, default=False, what="IA3 target rule")
        chosen = [p for p in kernels if chosen[p]]
        if self.feedforward is None:  # the default rule may well match none of the targets
            rules, strict = _rules(DEFAULT_FEEDFORWARD, "feedforward rule"), False
        else:
            rules, strict = self.feedforward, True
        feedforward = tree.resolve_rules(rules, chosen, default=False, require_match=False)
        if strict:
            for pattern, _ in rules:
                if not any(re.fullmatch(pattern, p) for p in chosen):
                    near = ", ".join(tree.closest_paths(pattern, chosen)) or "none"
                    raise ValueError(f"IA3 feedforward rule {pattern!r} matches no target; "
                                     f"feedforward layers must be among the targets, closest: "
                                     f"{near}")
        inputs = tree.resolve_rules(self.input_axes, chosen, default=1, require_match=False)
        plan = {}
        for path in chosen:
            shape, n_in = tuple(flat[path].shape), int(inputs[path])
            if not 0 < n_in < len(shape):
                raise ValueError(f"IA3 target {path} {shape}: {n_in} input axes leave no "
                                 f"output axis")
            plan[path] = Target(path, bool(feedforward[path]), n_in, shape)
        return plan

    # --- the Method interface --------------------------------------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with ``ia3_l = 1`` beside every target (vectors already there are kept)."""
        del rng, stats
        flat = dict(tree.flatten(params))
        for target in self.plan(params).values():
            if target.vector in flat:
                have = tuple(flat[target.vector].shape)
                if have != target.vector_shape:
                    raise ValueError(f"IA3 vector {target.vector} is {have}; {target.path} "
                                     f"{target.shape} needs {target.vector_shape}")
                continue
            flat[target.vector] = jnp.ones(target.vector_shape, flat[target.path].dtype)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """A vector takes its kernel's input axes (feedforward) or output axes."""
        flat_logical, flat_shapes = dict(tree.flatten(logical)), tree.flatten(shapes)
        for path, target in self.plan(shapes).items():
            if target.vector in flat_shapes:
                axes = tuple(flat_logical.get(path) or ())
                axes = axes + (None,) * (len(target.shape) - len(axes))
                n_in = target.input_axes
                flat_logical[target.vector] = axes[:n_in] if target.feedforward else axes[n_in:]
        return tree.unflatten(flat_logical)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """``module.apply`` with each adapted layer's input or output rescaled."""
        by_module = {sites.parent(p): t.feedforward
                     for p, t in self.plan(variables["params"]).items()}
        if getattr(getattr(module, "config", None), "scan_layers", False):
            by_module = tree.with_layer_view(by_module, what="IA3's feedforward choice")
        with sites.intercept(functools.partial(_rescale, feedforward=by_module),
                             sites.holding(L)):
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """The base with every vector folded into its kernel (:func:`fold`)."""
        return fold(params, self)


def _rescale(call: sites.Call, feedforward: dict[str, bool]):
    scale = call.param(L)
    if not feedforward[call.path]:
        y = call.output()
        return y * scale.astype(y.dtype)
    x = call.inputs
    scaled = x * scale.astype(x.dtype)
    if call.args:
        return call.run(scaled, *call.args[1:], **call.kwargs)
    first = next(iter(call.kwargs))
    return call.run(**{**call.kwargs, first: scaled})


def fold(params, method: IA3) -> dict:
    """Plain params computing what ``method`` computes on ``params``: an output-scaled layer's
    kernel columns and bias times ``l``, a feedforward layer's kernel rows times ``l``."""
    flat = dict(tree.flatten(params))
    for path, target in method.plan(params).items():
        if target.vector not in flat:
            continue
        scale, kernel = flat.pop(target.vector), flat[path]
        if target.feedforward:
            factor = scale.reshape(scale.shape + (1,) * (kernel.ndim - scale.ndim))
        else:
            factor = scale
            bias = sites.join(sites.parent(path), "bias")
            if bias in flat:
                flat[bias] = (flat[bias] * scale).astype(flat[bias].dtype)
        flat[path] = (kernel * factor).astype(kernel.dtype)
    return tree.unflatten(flat)


# ---------------------------------------------------------------------------------------------
# PEFT's on-disk format
# ---------------------------------------------------------------------------------------------


def _hf_names(model, flat) -> dict:
    """``{our path: (HF tensor name, layout)}`` for ``model``'s ``transformers`` class."""
    fmt = hf.FORMATS[model.family]
    _, prefixed = fmt.architecture(model.head)
    prefix = fmt.prefix if prefixed else ""
    return {p: fmt.hf_name(p, prefix) for p in flat}


def _module(name: str) -> str:
    return name.rpartition(".")[0]


def _peft_lists(targets: set, feedforward: set, candidates: set) -> tuple[list, list]:
    """PEFT's ``target_modules`` and ``feedforward_modules``: last name components when they
    select exactly these modules under PEFT's matching (targets: the name or a ``.``-suffix;
    feedforward: any suffix of a target's name), full module names otherwise."""
    short = {n.rpartition(".")[2] for n in targets}
    short_ff = {n.rpartition(".")[2] for n in feedforward}
    if ({n for n in candidates if n.rpartition(".")[2] in short} == targets
            and {n for n in targets if any(n.endswith(s) for s in short_ff)} == feedforward):
        return sorted(short), sorted(short_ff)
    return sorted(targets), sorted(feedforward)


def export_ia3_peft(method: IA3, params, model, directory: str, *,
                    base_model_name_or_path: str | None = None) -> dict:
    """Write ``params``' IA³ vectors (and the ``also_train`` modules, as PEFT's
    ``modules_to_save``) as a PEFT adapter for ``model``'s ``transformers`` class, atomically.
    Returns the adapter config written."""
    flat = tree.flatten(params)
    plan = {p: t for p, t in method.plan(params).items() if t.vector in flat}
    if not plan:
        raise ValueError("export_ia3_peft: params hold no IA3 vectors")
    base = strip_vectors(flat)
    tree.check_same_structure(model.param_shapes(), tree.unflatten(base))
    names = _hf_names(model, base)

    tensors, targets, feedforward = {}, set(), set()
    for path, target in plan.items():
        module = _module(names[path][0])
        vector = np.asarray(flat[target.vector], np.float32).reshape(-1)
        tensors[f"{KEY_PREFIX}{module}.{L}"] = (vector[None, :] if target.feedforward
                                                 else vector[:, None])
        targets.add(module)
        if target.feedforward:
            feedforward.add(module)

    # Modules trained beside the adapter travel whole, as PEFT's modules_to_save.
    also = tree.resolve_rules([(p, True) for p in method.also_train], list(base),
                              default=False, require_match=False)
    saved = {_module(names[p][0]) for p, chosen in also.items() if chosen}
    clash = sorted(saved & targets)
    if clash:
        raise ValueError(f"export_ia3_peft: module {clash[0]!r} trains whole and carries an "
                         f"IA3 vector; PEFT cannot hold both")
    for path, value in base.items():
        name, layout = names[path]
        if _module(name) in saved:
            tensors[KEY_PREFIX + name] = layout.to_hf(np.asarray(value, np.float32))

    candidates = {_module(names[p][0]) for p in base if sites.leaf(p) == "kernel"} - saved
    target_modules, feedforward_modules = _peft_lists(targets, feedforward, candidates)
    config = {
        "peft_type": PEFT_TYPE, "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": target_modules, "feedforward_modules": feedforward_modules,
        "modules_to_save": sorted(saved) or None, "exclude_modules": None,
        "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True,
        "revision": None,
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


def _read_adapter(directory: str) -> tuple[dict, str, dict]:
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
    with open(config_path) as file:
        config = json.load(file)
    if config.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{config_path}: peft_type={config.get('peft_type')!r}; only "
                         f"{PEFT_TYPE!r} adapters import here")
    if config.get("fan_in_fan_out", False):
        raise ValueError(f"{config_path}: fan_in_fan_out=True is not supported (only False)")
    return config, weights_path, safetensors.numpy.load_file(weights_path)


def _is_feedforward(config: dict, module: str) -> bool:
    """PEFT's ``_check_target_module_feedforward``: a regex string fully matches, a list
    entry is any suffix of the module name."""
    rule = config.get("feedforward_modules") or []
    if isinstance(rule, str):
        return bool(re.fullmatch(rule, module))
    return any(module.endswith(key) for key in rule)


def _exact(paths) -> tuple:
    return tuple(re.escape(p) for p in sorted(paths))


def import_ia3_peft(directory: str, model, params) -> tuple[IA3, dict]:
    """``(IA3 method, params with vectors)`` from a PEFT IA³ adapter for ``model``. ``params``
    are the base weights (vectors already in them are replaced); ``modules_to_save`` weights
    replace theirs and train (``also_train``). An adapter that does not fit the model is a
    one-line error naming the tensor and the shapes."""
    config, weights_path, tensors = _read_adapter(directory)
    flat = strip_vectors(tree.flatten(params))
    tree.check_same_structure(model.param_shapes(), tree.unflatten(flat))
    fmt = hf.FORMATS[model.family]
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
    by_module = {name[: -len(".weight")]: path for name, (path, _) in by_tensor.items()
                 if name.endswith(".weight") and sites.leaf(path) == "kernel"}

    vectors, saved = {}, {}
    for key, name in names.items():
        module, _, leaf = name.rpartition(".")
        if leaf == L:
            if module not in by_module:
                near = ", ".join(tree.closest_paths(module, by_module))
                raise ValueError(f"{weights_path}: adapter module {module!r} has no "
                                 f"counterpart in this {model.family} model; closest: {near}")
            vectors[by_module[module]] = (module, tensors[key])
        elif name in by_tensor:
            saved[name] = tensors[key]
        else:
            near = ", ".join(tree.closest_paths(name, by_tensor))
            raise ValueError(f"{weights_path}: tensor {key!r} has no counterpart in this "
                             f"{model.family} model; closest: {near}")
    if not vectors:
        raise ValueError(f"{weights_path}: the adapter holds no {L} vectors")

    feedforward = {p for p, (module, _) in vectors.items() if _is_feedforward(config, module)}
    method = IA3(targets=_exact(vectors), feedforward=_exact(feedforward),
                 also_train=tuple(re.escape(by_tensor[name][0]) for name in sorted(saved)))
    for path, target in method.plan(tree.unflatten(flat)).items():
        module, value = vectors[path]
        size = int(np.prod(target.vector_shape))
        want = (1, size) if target.feedforward else (size, 1)
        if tuple(value.shape) != want:
            kind = "feedforward (input)" if target.feedforward else "output"
            raise ValueError(f"{weights_path}: {module}.{L} {tuple(value.shape)} does not fit "
                             f"this model's {path} {target.shape} scaled on its {kind}, which "
                             f"needs {want}")
        flat[target.vector] = np.asarray(value, np.float32).reshape(target.vector_shape)
    for name, value in saved.items():
        path, layout = by_tensor[name]
        shape = tuple(flat[path].shape)
        want = tuple(jax.eval_shape(layout.to_hf, jax.ShapeDtypeStruct(shape, np.float32)).shape)
        if tuple(value.shape) != want:
            raise ValueError(f"{weights_path}: module tensor {name!r} {tuple(value.shape)} does "
                             f"not fit this model's {path} {shape}, which needs {want}")
        flat[path] = np.asarray(layout.to_ours(value, shape), np.float32)
    return method, jax.tree.map(jnp.asarray, tree.unflatten(flat))
