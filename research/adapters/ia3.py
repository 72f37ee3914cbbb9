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
``base_model.model.M.ia3_l``) through :mod:`research.peft_format`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from research import peft_format, sites, tree
from research.lowrank.lora import DEFAULT_INPUT_AXES
from research.methods import Applied, Method, register
from research.peft_format import KEY_PREFIX

L = "ia3_l"
VECTOR_PATTERN = rf"(.*/)?{L}"
# PEFT's defaults for BERT / ViT / Llama: keys, values and the MLP's output projection, the
# latter scaled on its input (the paper's l_ff sits after the MLP's nonlinearity).
DEFAULT_TARGETS = (r"(.*/)?attn/(key|value)/kernel", r"(.*/)?mlp/(wo|down)/kernel")
DEFAULT_FEEDFORWARD = (r"(.*/)?mlp/(wo|down)/kernel",)

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
        set_(self, "targets", tree.choice_rules(self.targets, "IA3 target"))
        if self.feedforward is not None:
            set_(self, "feedforward",
                 tree.choice_rules(self.feedforward, "IA3 feedforward rule"))
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
            rules, strict = tree.choice_rules(DEFAULT_FEEDFORWARD, "IA3 feedforward rule"), False
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
    names = peft_format.hf_names(model, base)

    tensors, targets, feedforward = {}, set(), set()
    for path, target in plan.items():
        module = peft_format.module_name(names[path][0])
        vector = np.asarray(flat[target.vector], np.float32).reshape(-1)
        tensors[f"{KEY_PREFIX}{module}.{L}"] = (vector[None, :] if target.feedforward
                                                 else vector[:, None])
        targets.add(module)
        if target.feedforward:
            feedforward.add(module)

    saved, saved_tensors = peft_format.modules_to_save(
        method.also_train, base, names, targets, what="export_ia3_peft",
        carries="an IA3 vector")
    tensors.update(saved_tensors)
    candidates = set(peft_format.adaptable_modules(names)) - set(saved)
    target_modules, feedforward_modules = _peft_lists(targets, feedforward, candidates)
    config = {
        "peft_type": PEFT_TYPE, "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": target_modules, "feedforward_modules": feedforward_modules,
        "modules_to_save": saved or None, "exclude_modules": None,
        "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True,
        "revision": None,
    }
    peft_format.write_adapter(directory, config, tensors)
    return config


def _is_feedforward(config: dict, module: str) -> bool:
    """PEFT's ``_check_target_module_feedforward``: a regex string fully matches, a list
    entry is any suffix of the module name."""
    rule = config.get("feedforward_modules") or []
    if isinstance(rule, str):
        return bool(re.fullmatch(rule, module))
    return any(module.endswith(key) for key in rule)


def import_ia3_peft(directory: str, model, params) -> tuple[IA3, dict]:
    """``(IA3 method, params with vectors)`` from a PEFT IA³ adapter for ``model``. ``params``
    are the base weights (vectors already in them are replaced); ``modules_to_save`` weights
    replace theirs and train (``also_train``). An adapter that does not fit the model is a
    one-line error naming the tensor and the shapes."""
    adapter = peft_format.read_adapter(directory, (PEFT_TYPE,), {"fan_in_fan_out": False})
    weights_path = adapter.weights_path
    flat = strip_vectors(tree.flatten(params))
    tree.check_same_structure(model.param_shapes(), tree.unflatten(flat))
    found = peft_format.sort_tensors(adapter, model, flat, (L,), holding=f"{L} vectors")

    feedforward = {p for p, (module, _) in found.adapted.items()
                   if _is_feedforward(adapter.config, module)}
    method = IA3(targets=peft_format.exact_rules(found.adapted),
                 feedforward=peft_format.exact_rules(feedforward),
                 also_train=peft_format.exact_rules(found.saved))
    for path, target in method.plan(tree.unflatten(flat)).items():
        module, parts = found.adapted[path]
        value = parts[L]
        size = int(np.prod(target.vector_shape))
        want = (1, size) if target.feedforward else (size, 1)
        if tuple(value.shape) != want:
            kind = "feedforward (input)" if target.feedforward else "output"
            raise ValueError(f"{weights_path}: {module}.{L} {tuple(value.shape)} does not fit "
                             f"this model's {path} {target.shape} scaled on its {kind}, which "
                             f"needs {want}")
        flat[target.vector] = np.asarray(value, np.float32).reshape(target.vector_shape)
    flat.update(peft_format.load_saved(found.saved, found.names, flat, weights_path))
    return method, jax.tree.map(jnp.asarray, tree.unflatten(flat))
