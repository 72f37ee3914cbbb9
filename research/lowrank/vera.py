"""VeRA (Kopiczko, Blankevoort & Asano, 2024, "VeRA: Vector-based Random Matrix Adaptation"):
LoRA's update with one pair of *frozen random* low-rank matrices shared by every adapted layer,
each layer learning only two scaling vectors: ``x·W + Λ_b·B·Λ_d·A·x``.

As PEFT 0.21 does it (torch's ``[out, in]`` view): the shared ``A [r, in_max]`` and
``B [out_max, r]`` are drawn once, kaiming-uniform (``U(±sqrt(6 / fan_in))``: ``fan_in`` is
``in_max`` for A and ``r`` for B), as wide as the widest target; a layer with ``in`` inputs and
``out`` outputs uses ``A[:, :in]`` and ``B[:out]``, and adds
``lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))``, with ``lambda_d [r]``
starting at ``d_initial`` (0.1) and ``lambda_b [out]`` at 0, so the model is unchanged at step 0.

As a tree transform: the shared matrices are two frozen leaves at the root, ``vera/a
[in_max, r]`` and ``vera/b [r, out_max]`` (LoRA's orientation: inputs, then the rank, then
outputs), drawn from ``projection_prng_key`` alone, so every run with the same targets and key
shares them, as in PEFT (the values differ from torch's draw; the distribution is the same).
:meth:`VeRA.init` puts ``vera_lambda_d [r]`` and ``vera_lambda_b`` (the kernel's output axes:
``[heads, head_dim]`` for a query kernel) beside each target kernel. A kernel's inputs and
outputs are its flattened input and output axes in row-major order, torch's ``Linear`` order
(:func:`research.models.hf.linear`), so the attention output ``[heads, head_dim, embed]`` takes
``heads * head_dim`` inputs. :meth:`VeRA.apply` adds the path at every layer holding the vectors
(``sites.intercept``; the shared matrices reach it by closure, so a scanned stack works);
:meth:`VeRA.export` folds it into the kernels and drops the shared matrices.

:func:`export_vera_peft` and :func:`import_vera_peft` read and write PEFT's on-disk format
(``adapter_config.json`` + ``adapter_model.safetensors``: ``base_model.vera_A``,
``base_model.vera_B`` and ``base_model.model.M.vera_lambda_{b,d}``, ``save_projection=True``)
through :mod:`research.peft_format`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from research import peft_format, sites, tree
from research.lowrank.lora import DEFAULT_INPUT_AXES
from research.methods import Applied, Method, register, training
from research.models.dropout import dropout
from research.peft_format import KEY_PREFIX

LAMBDA_D, LAMBDA_B = "vera_lambda_d", "vera_lambda_b"
SHARED = "vera"  # the root of the shared matrices
SHARED_A, SHARED_B = f"{SHARED}/a", f"{SHARED}/b"
VECTOR_PATTERN = rf"(.*/)?({LAMBDA_D}|{LAMBDA_B})"
# PEFT's default targets for BERT, ViT and Llama: the attention's query and value projections.
DEFAULT_TARGETS = (r"(.*/)?attn/(query|value)/kernel",)

PEFT_A, PEFT_B = "base_model.vera_A", "base_model.vera_B"
PEFT_TYPE = "VERA"


@dataclasses.dataclass(frozen=True)
class Target:
    """What :meth:`VeRA.plan` decided for one kernel."""
    path: str
    input_axes: int
    shape: tuple

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[:self.input_axes])

    @property
    def fan_out(self) -> int:
        return math.prod(self.shape[self.input_axes:])

    @property
    def out_shape(self) -> tuple:
        return self.shape[self.input_axes:]

    @property
    def lambda_d(self) -> str:
        return sites.join(sites.parent(self.path), LAMBDA_D)

    @property
    def lambda_b(self) -> str:
        return sites.join(sites.parent(self.path), LAMBDA_B)



def strip_vera(flat: dict) -> dict:
    """``flat`` without VeRA's leaves (vectors and shared matrices)."""
    return {p: v for p, v in flat.items()
            if sites.leaf(p) not in (LAMBDA_D, LAMBDA_B) and p not in (SHARED_A, SHARED_B)}


def shared_shapes(plan: dict[str, Target], rank: int) -> tuple[tuple, tuple]:
    """The shapes of ``vera/a`` and ``vera/b`` that ``plan``'s targets need at ``rank``."""
    in_max = max(t.fan_in for t in plan.values())
    out_max = max(t.fan_out for t in plan.values())
    return (in_max, rank), (rank, out_max)


def _check_shared(plan: dict[str, Target], rank: int, a_shape: tuple, b_shape: tuple) -> None:
    """Shared matrices must have the method's rank and cover every target's sizes."""
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
        raise ValueError(f"VeRA shared matrices {SHARED_A} {a_shape} and {SHARED_B} {b_shape} "
                         f"are not [in_max, r] and [r, out_max]")
    if a_shape[1] != rank:
        raise ValueError(f"config.method.rank={rank} does not match the shared matrices' rank "
                         f"{a_shape[1]} ({SHARED_A} {a_shape}, {SHARED_B} {b_shape})")
    for target in plan.values():
        if target.fan_in > a_shape[0] or target.fan_out > b_shape[1]:
            raise ValueError(f"VeRA target {target.path} {target.shape} has {target.fan_in} "
                             f"inputs and {target.fan_out} outputs; the shared matrices cover "
                             f"{a_shape[0]} ({SHARED_A} {a_shape}) and {b_shape[1]} "
                             f"({SHARED_B} {b_shape})")


@register("vera")
@dataclasses.dataclass(frozen=True)
class VeRA(Method):
    """VeRA options (``config.method = dict(name='vera', ...)``).

    targets: regexes, or ordered ``(regex, bool)`` rules (first match wins, so an exclusion can
        precede a broad rule), over kernel paths; default the attention's query and value.
    rank: the shared matrices' rank (PEFT's ``r``, default 256 as there).
    d_initial: where every ``lambda_d`` starts (default 0.1, the paper's and PEFT's).
    dropout: dropout on the path's input while training (PEFT's ``vera_dropout``; 'dropout' rng).
    projection_prng_key: the seed of the shared matrices (PEFT's ``projection_prng_key``).
    also_train: extra path regexes that train (a classifier head); ``trainable``, when given,
        replaces the default (the vectors plus ``also_train``; the shared matrices stay frozen).
    input_axes: ``(regex, n)`` rules saying how many leading kernel axes are inputs (default 1;
        the zoo's attention output has 2).
    """

    targets: tuple = DEFAULT_TARGETS
    rank: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_prng_key: int = 0
    also_train: tuple = ()
    input_axes: tuple = DEFAULT_INPUT_AXES

    adapter_leaves: ClassVar[tuple] = (VECTOR_PATTERN,)

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "targets",
             tree.choice_rules(self.targets, "config.method.targets: VeRA target"))
        set_(self, "also_train", tuple(self.also_train or ()))
        set_(self, "input_axes", tuple(tuple(r) if isinstance(r, list) else r
                                       for r in self.input_axes or ()))
        if not self.targets:
            raise ValueError("config.method.targets: VeRA needs regexes over kernel paths")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"config.method.rank={self.rank!r} is not a positive integer")
        if not isinstance(self.d_initial, (int, float)) or isinstance(self.d_initial, bool):
            raise ValueError(f"config.method.d_initial={self.d_initial!r} is not a number")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config.method.dropout={self.dropout!r} is not in [0, 1)")
        if not isinstance(self.projection_prng_key, int):
            raise ValueError(f"config.method.projection_prng_key={self.projection_prng_key!r} "
                             f"is not an integer")
        set_(self, "trainable", (*self.adapter_leaves, *self.also_train)
             if self.trainable is None else tuple(self.trainable))

    def plan(self, params) -> dict[str, Target]:
        """``{kernel path: Target}`` for ``params`` (arrays or shapes). A target rule matching
        no kernel, a rule set choosing none, and shared matrices already in ``params`` of
        another rank or too small for a target are one-line errors."""
        full = tree.flatten(params)
        flat = strip_vera(full)
        kernels = [p for p in flat if sites.leaf(p) == "kernel"]
        chosen = tree.resolve_rules(self.targets, kernels, default=False,
                                    what="config.method.targets: VeRA target rule")
        chosen = [p for p in kernels if chosen[p]]
        if not chosen:
            raise ValueError(f"config.method.targets {[p for p, _ in self.targets]} choose no "
                             f"kernel (every match is excluded)")
        inputs = tree.resolve_rules(self.input_axes, chosen, default=1, require_match=False)
        plan = {}
        for path in chosen:
            shape, n_in = tuple(flat[path].shape), int(inputs[path])
            if not 0 < n_in < len(shape):
                raise ValueError(f"VeRA target {path} {shape}: {n_in} input axes leave no "
                                 f"output axis (config.method.input_axes)")
            plan[path] = Target(path, n_in, shape)
        if SHARED_A in full and SHARED_B in full:
            _check_shared(plan, self.rank, tuple(full[SHARED_A].shape),
                          tuple(full[SHARED_B].shape))
        return plan

    # --- the Method interface --------------------------------------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with the shared matrices (kaiming-uniform from ``projection_prng_key``)
        and ``lambda_d = d_initial``, ``lambda_b = 0`` beside every target; leaves already
        there are kept."""
        del rng, stats
        plan = self.plan(params)
        flat = dict(tree.flatten(params))
        if SHARED_A not in flat or SHARED_B not in flat:
            a_shape, b_shape = shared_shapes(plan, self.rank)
            key_a, key_b = jax.random.split(jax.random.key(self.projection_prng_key))
            bound_a, bound_b = math.sqrt(6.0 / a_shape[0]), math.sqrt(6.0 / self.rank)
            flat[SHARED_A] = jax.random.uniform(key_a, a_shape, jnp.float32, -bound_a, bound_a)
            flat[SHARED_B] = jax.random.uniform(key_b, b_shape, jnp.float32, -bound_b, bound_b)
        for target in plan.values():
            dtype = flat[target.path].dtype
            for path, shape, value in ((target.lambda_d, (self.rank,), self.d_initial),
                                       (target.lambda_b, target.out_shape, 0.0)):
                if path not in flat:
                    flat[path] = jnp.full(shape, value, dtype)
                elif tuple(flat[path].shape) != shape:
                    raise ValueError(f"VeRA vector {path} is {tuple(flat[path].shape)}; "
                                     f"{target.path} {target.shape} at rank {self.rank} needs "
                                     f"{shape}")
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """``lambda_b`` takes its kernel's output axes; ``lambda_d`` and the shared matrices
        are replicated."""
        flat_logical, flat_shapes = dict(tree.flatten(logical)), tree.flatten(shapes)
        for path, target in self.plan(shapes).items():
            if target.lambda_b in flat_shapes:
                axes = tuple(flat_logical.get(path) or ())
                axes = axes + (None,) * (len(target.shape) - len(axes))
                flat_logical[target.lambda_b] = axes[target.input_axes:]
                flat_logical[target.lambda_d] = (None,)
        for path in (SHARED_A, SHARED_B):
            if path in flat_shapes:
                flat_logical[path] = (None, None)
        return tree.unflatten(flat_logical)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """``module.apply`` (on the params without the shared root) with VeRA's path added at
        every adapted layer; dropout on its input in training (``deterministic=False``)."""
        params = variables["params"]
        self.plan(params)
        shared = params.get(SHARED) or {}
        if "a" not in shared or "b" not in shared:
            raise ValueError(f"VeRA params hold no shared matrices {SHARED_A} / {SHARED_B} "
                             f"(VeRA.init adds them)")
        model_params = {k: v for k, v in params.items() if k != SHARED}
        rate = self.dropout if training(kwargs) else 0.0
        path = functools.partial(_vera_path, a=shared["a"], b=shared["b"], rate=rate)
        with sites.intercept(path, sites.holding(LAMBDA_D, LAMBDA_B)):
            return Applied(module.apply({**variables, "params": model_params}, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """The base with every layer's update folded into its kernel (:func:`fold`)."""
        return fold(params, self)


def _vera_path(call: sites.Call, a, b, rate: float):
    """The layer's output plus ``lambda_b ⊙ (((x·A[:in]) ⊙ lambda_d)·B[:, :out])``."""
    d, scale = call.param(LAMBDA_D), call.param(LAMBDA_B)
    y, n_in, dtype = call.output(), call.input_axes, call.dtype(d)
    x = call.inputs.astype(dtype)
    in_shape = x.shape[x.ndim - n_in:]
    if rate:
        x = dropout(call.layer.make_rng("dropout"), rate, x)
    rank = a.shape[1]
    a_in = a[:math.prod(in_shape)].astype(dtype).reshape(*in_shape, rank)
    b_out = b[:, :scale.size].astype(dtype).reshape(rank, *scale.shape)
    hidden = jnp.tensordot(x, a_in, n_in) * d.astype(dtype)
    delta = jnp.tensordot(hidden, b_out, 1) * scale.astype(dtype)
    return y + delta.astype(y.dtype)


def delta_weight(target: Target, a, b, lambda_d, lambda_b):
    """``ΔW`` in the kernel's shape: ``(A[:in] ⊙ lambda_d)·(B[:, :out] ⊙ lambda_b)``."""
    left = a[:target.fan_in] * lambda_d
    right = b[:, :target.fan_out] * jnp.reshape(lambda_b, (-1,))
    return jnp.dot(left, right, precision=jax.lax.Precision.HIGHEST).reshape(target.shape)


def fold(params, method: VeRA) -> dict:
    """Plain params computing what ``method`` computes on ``params``: ``W + ΔW`` at every
    target holding vectors, the vectors and the shared matrices dropped."""
    flat = dict(tree.flatten(params))
    plan = {p: t for p, t in method.plan(params).items() if t.lambda_d in flat}
    if not plan:
        return tree.unflatten(strip_vera(flat))
    if SHARED_A not in flat or SHARED_B not in flat:
        raise ValueError(f"VeRA export: params hold vectors but no shared matrices "
                         f"{SHARED_A} / {SHARED_B}")
    a, b = flat.pop(SHARED_A), flat.pop(SHARED_B)
    for path, target in plan.items():
        kernel = flat[path]
        delta = delta_weight(target, a.astype(jnp.float32), b.astype(jnp.float32),
                             flat.pop(target.lambda_d), flat.pop(target.lambda_b))
        flat[path] = (kernel + delta).astype(kernel.dtype)
    return tree.unflatten(flat)


# ---------------------------------------------------------------------------------------------
# PEFT's on-disk format
# ---------------------------------------------------------------------------------------------


def export_vera_peft(method: VeRA, params, model, directory: str, *,
                     base_model_name_or_path: str | None = None) -> dict:
    """Write ``params``' VeRA vectors, the shared matrices (sliced to the exported targets'
    widest sizes, as PEFT sizes them) and the ``also_train`` modules (PEFT's
    ``modules_to_save``) as a PEFT adapter for ``model``'s ``transformers`` class, atomically.
    Returns the adapter config written."""
    flat = tree.flatten(params)
    plan = {p: t for p, t in method.plan(params).items() if t.lambda_d in flat}
    if not plan:
        raise ValueError("export_vera_peft: params hold no VeRA vectors")
    if SHARED_A not in flat or SHARED_B not in flat:
        raise ValueError(f"export_vera_peft: params hold no shared matrices {SHARED_A} / "
                         f"{SHARED_B}")
    base = strip_vera(flat)
    tree.check_same_structure(model.param_shapes(), tree.unflatten(base))
    names = peft_format.hf_names(model, base)

    tensors, targets = {}, set()
    for path, target in plan.items():
        name, layout = names[path]
        peft_format.check_linear("export_vera_peft", path, target.shape, layout,
                                 target.input_axes)
        module = peft_format.module_name(name)
        tensors[f"{KEY_PREFIX}{module}.{LAMBDA_D}"] = np.asarray(flat[target.lambda_d],
                                                                 np.float32)
        tensors[f"{KEY_PREFIX}{module}.{LAMBDA_B}"] = np.asarray(
            flat[target.lambda_b], np.float32).reshape(-1)
        targets.add(module)
    (in_max, rank), (_, out_max) = shared_shapes(plan, int(flat[SHARED_A].shape[1]))
    tensors[PEFT_A] = np.asarray(flat[SHARED_A], np.float32)[:in_max].T
    tensors[PEFT_B] = np.asarray(flat[SHARED_B], np.float32)[:, :out_max].T

    saved, saved_tensors = peft_format.modules_to_save(
        method.also_train, base, names, targets, what="export_vera_peft",
        carries="VeRA vectors")
    tensors.update(saved_tensors)
    candidates = set(peft_format.adaptable_modules(names))
    config = {
        "peft_type": PEFT_TYPE, "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "target_modules": peft_format.target_modules(targets, candidates),
        "projection_prng_key": method.projection_prng_key, "save_projection": True,
        "vera_dropout": float(method.dropout), "d_initial": float(method.d_initial),
        "fan_in_fan_out": False, "bias": "none", "modules_to_save": saved or None,
        "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True, "revision": None,
    }
    peft_format.write_adapter(directory, config, tensors)
    return config


def import_vera_peft(directory: str, model, params) -> tuple[VeRA, dict]:
    """``(VeRA method, params with the shared matrices and vectors)`` from a PEFT VeRA adapter
    for ``model``. ``params`` are the base weights (VeRA leaves already in them are replaced);
    ``modules_to_save`` weights replace theirs and train (``also_train``). An adapter that does
    not fit the model is a one-line error naming the tensor and the shapes."""
    adapter = peft_format.read_adapter(directory, (PEFT_TYPE,),
                                       {"fan_in_fan_out": False, "bias": "none"})
    config, weights_path, tensors = adapter.config, adapter.weights_path, adapter.tensors
    if not config.get("save_projection", True):
        raise ValueError(f"{adapter.config_path}: save_projection=False leaves the shared "
                         f"matrices to torch's PRNG, which Scion does not replay; save them "
                         f"(True)")
    flat = strip_vera(tree.flatten(params))
    tree.check_same_structure(model.param_shapes(), tree.unflatten(flat))
    missing = [name for name in (PEFT_A, PEFT_B) if name not in tensors]
    if missing:
        raise ValueError(f"{weights_path}: no {missing[0]!r}; the shared matrices must be "
                         f"saved (save_projection=True)")
    # The shared matrices sit outside base_model.model.: out of the tensors sorted below.
    a_hf, b_hf = tensors.pop(PEFT_A), tensors.pop(PEFT_B)
    rank = config.get("r")
    if a_hf.ndim != 2 or b_hf.ndim != 2 or a_hf.shape[0] != b_hf.shape[1]:
        raise ValueError(f"{weights_path}: {PEFT_A} {tuple(a_hf.shape)} and {PEFT_B} "
                         f"{tuple(b_hf.shape)} are not [r, in_max] and [out_max, r]")
    if a_hf.shape[0] != rank:
        raise ValueError(f"{weights_path}: {PEFT_A} {tuple(a_hf.shape)} has rank "
                         f"{a_hf.shape[0]}; its {peft_format.ADAPTER_CONFIG} says r={rank!r}")
    found = peft_format.sort_tensors(adapter, model, flat, (LAMBDA_D, LAMBDA_B),
                                     holding=f"{LAMBDA_D} / {LAMBDA_B} vectors")

    method = VeRA(targets=peft_format.exact_rules(found.adapted), rank=int(rank),
                  d_initial=float(config.get("d_initial", 0.1)),
                  dropout=float(config.get("vera_dropout", 0.0) or 0.0),
                  projection_prng_key=int(config.get("projection_prng_key", 0)),
                  also_train=peft_format.exact_rules(found.saved))
    for path, target in method.plan(tree.unflatten(flat)).items():
        module, parts = found.adapted[path]
        if set(parts) != {LAMBDA_D, LAMBDA_B}:
            raise ValueError(f"{weights_path}: {path} has {sorted(parts)}; VeRA needs both "
                             f"{LAMBDA_D} and {LAMBDA_B}")
        if target.fan_in > a_hf.shape[1] or target.fan_out > b_hf.shape[0]:
            raise ValueError(f"{weights_path}: {PEFT_A} {tuple(a_hf.shape)} and {PEFT_B} "
                             f"{tuple(b_hf.shape)} cover {a_hf.shape[1]} inputs and "
                             f"{b_hf.shape[0]} outputs; this model's {path} {target.shape} "
                             f"has {target.fan_in} and {target.fan_out}")
        for leaf, want, ours in ((LAMBDA_D, (rank,), (rank,)),
                                 (LAMBDA_B, (target.fan_out,), target.out_shape)):
            value = parts[leaf]
            if tuple(value.shape) != want:
                raise ValueError(f"{weights_path}: {KEY_PREFIX}{module}.{leaf} "
                                 f"{tuple(value.shape)} does not fit this model's {path} "
                                 f"{target.shape} at rank {rank}, which needs {want}")
            flat[sites.join(sites.parent(path), leaf)] = np.asarray(value, np.float32).reshape(
                ours)
    flat[SHARED_A] = np.asarray(a_hf, np.float32).T
    flat[SHARED_B] = np.asarray(b_hf, np.float32).T
    flat.update(peft_format.load_saved(found.saved, found.names, flat, weights_path))
    return method, jax.tree.map(jnp.asarray, tree.unflatten(flat))
