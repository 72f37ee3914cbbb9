"""Diffscaler (Nair, Valanarasu & Patel, 2024, "Diffscaler: Enhancing the Generative Prowess of
Diffusion Transformers"): keep one pre-trained transformer frozen and give every chosen linear
layer a task-specific *Affiner*,

    y = (1 + a)⊙(W·x) + b̂ + b + s·W_up·relu(W_down·x),

a per-output-channel rescaling of the frozen weight ``W`` (re-using the subspace it learned),
a new bias ``b`` beside the frozen ``b̂``, and a small low-rank nonlinear branch that can reach
directions the pre-training data never needed (the "additional task-specific subspaces").
Parameters of different tasks are independent, so one model serves several.

Here ``diffscaler/scale`` holds ``1 + a`` (init 1), ``diffscaler/shift`` holds ``b`` (init 0)
and ``diffscaler/{down, up}`` the branch of width ``rank`` (``down`` drawn like a torch linear
layer, ``up`` zero; ``rank=0`` leaves it out), beside each target's kernel; the model is
unchanged at step 0.

Not SSF (:mod:`research.adapters.ssf`), though the affine part spans the same functions: SSF
scales a layer's whole output after it, bias included (``γ⊙(W·x + b̂) + β``), and norms too;
Diffscaler rescales the weight alone and adds to the bias, and only linear layers (the
branch reads their input). The affine part folds into the layer, ``W·diag(1 + a)`` and ``b̂ +
b``; the branch is nonlinear and cannot, so :meth:`Diffscaler.export` folds the former and
keeps the latter beside the plain params (:meth:`Diffscaler.apply` still runs it).

Not verified against the authors' code (none was at hand): the form above is the paper's
Affiner as summarised from it; ``a`` per output channel and ``s`` a fixed scale are this
module's reading.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from research import sites, tree
from research.adapters.ssf import choose_modules, parse_rules, require_bias
from research.methods import Applied, Method, register

KEY = "diffscaler"
SCALE, SHIFT, DOWN, UP = "scale", "shift", "down", "up"
AFFINE = (SCALE, SHIFT)
OWN_PATTERN = rf"(.*/)?{KEY}/({SCALE}|{SHIFT}|{DOWN}|{UP})"
# The linear layers of every block (a diffusion transformer's qkv, projection and MLP).
DEFAULT_TARGETS = (r"(.*/)?layer_\d+/(attn/(query|key|value|out)|mlp/(wi|wo))",)


@dataclasses.dataclass(frozen=True)
class Target:
    """What :meth:`Diffscaler.plan` decided for one layer."""
    path: str
    inputs: tuple   # the kernel's input axes
    outputs: tuple  # its output axes (the bias's shape)


@register("diffscaler")
@dataclasses.dataclass(frozen=True)
class Diffscaler(Method):
    """Diffscaler options (``config.method = dict(name='diffscaler', ...)``).

    targets: regexes, or ordered ``(regex, bool)`` rules (first match wins), over the module
        paths of linear layers with a bias; default every linear layer of every block.
    rank: width of the nonlinear branch (0: the affine part alone, which folds entirely).
    subspace_scale: ``s``, the fixed factor on the branch.
    also_train: extra path regexes that train (a classifier head); ``trainable``, when given,
        replaces the default (the Affiners plus ``also_train``).
    """

    targets: tuple = DEFAULT_TARGETS
    rank: int = 8
    subspace_scale: float = 1.0
    also_train: tuple = ()

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "targets", parse_rules(self.targets, "Diffscaler target rule"))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"config.method.rank={self.rank!r} is not an integer >= 0")
        if not isinstance(self.subspace_scale, (int, float)) or self.subspace_scale < 0:
            raise ValueError(f"config.method.subspace_scale={self.subspace_scale!r} is not a "
                             f"number >= 0")
        set_(self, "also_train", tuple(self.also_train or ()))
        set_(self, "trainable", (OWN_PATTERN, *self.also_train)
             if self.trainable is None else tuple(self.trainable))

    def plan(self, params) -> dict[str, Target]:
        """``{layer path: Target}`` for ``params`` (arrays or shapes)."""
        flat = {p: v for p, v in tree.flatten(params).items() if f"/{KEY}/" not in f"/{p}"}
        modules = sorted(sites.parent(p) for p in flat if sites.leaf(p) == "kernel")
        plan = {}
        for module in choose_modules(self.targets, modules, "Diffscaler target rule"):
            outputs = require_bias(flat, module, "Diffscaler")
            shape = tuple(flat[sites.join(module, "kernel")].shape)
            plan[module] = Target(module, shape[:len(shape) - len(outputs)], outputs)
        return plan

    # --- the Method interface --------------------------------------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with an identity Affiner beside every target's kernel."""
        del stats
        flat = dict(tree.flatten(params))
        for index, target in enumerate(self.plan(params).values()):
            prefix = sites.join(target.path, KEY)
            flat[f"{prefix}/{SCALE}"] = jnp.ones(target.outputs, jnp.float32)
            flat[f"{prefix}/{SHIFT}"] = jnp.zeros(target.outputs, jnp.float32)
            if self.rank:
                # torch.nn.Linear's default: uniform within ±1/sqrt(fan_in).
                bound = 1.0 / math.sqrt(math.prod(target.inputs))
                flat[f"{prefix}/{DOWN}"] = jax.random.uniform(
                    jax.random.fold_in(rng, index), (*target.inputs, self.rank), jnp.float32,
                    -bound, bound)
                flat[f"{prefix}/{UP}"] = jnp.zeros((self.rank, *target.outputs), jnp.float32)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """Scale and shift shard like the bias; the branch takes the kernel's input and output
        axes, its rank unsharded."""
        flat, flat_shapes = dict(tree.flatten(logical)), tree.flatten(shapes)
        for target in self.plan(shapes).values():
            prefix = sites.join(target.path, KEY)
            bias = tuple(flat.get(sites.join(target.path, "bias")) or ())
            kernel = tuple(flat.get(sites.join(target.path, "kernel")) or ())
            kernel = kernel + (None,) * (len(target.inputs) + len(target.outputs) - len(kernel))
            for leaf, axes in ((SCALE, bias), (SHIFT, bias),
                               (DOWN, (*kernel[:len(target.inputs)], None)),
                               (UP, (None, *kernel[len(target.inputs):]))):
                if f"{prefix}/{leaf}" in flat_shapes:
                    flat[f"{prefix}/{leaf}"] = axes
        return tree.unflatten(flat)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """``module.apply`` with every target's output re-scaled, shifted and given the branch."""
        affine = functools.partial(_affine, subspace_scale=self.subspace_scale)
        with sites.intercept(affine, sites.holding(KEY)):
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """The affine part folded into each layer (:func:`fold`); a branch stays beside it."""
        return fold(params)


def _affine(call: sites.Call, subspace_scale: float):
    y = call.output()  # W·x + b̂
    own = call.param(KEY)
    if SCALE in own:
        scale, bias = own[SCALE], call.param("bias")
        # (1 + a)⊙(W·x) + b̂ + b, written so the frozen bias is never subtracted from y
        # (low-precision outputs would lose it): y⊙(1 + a) + (b + b̂ - b̂⊙(1 + a)).
        y = y * scale.astype(y.dtype) + (own[SHIFT] + bias - bias * scale).astype(y.dtype)
    if DOWN in own:
        dtype = call.dtype(own[DOWN])
        x = call.inputs.astype(dtype)
        hidden = jax.nn.relu(jnp.tensordot(x, own[DOWN].astype(dtype), call.input_axes))
        branch = jnp.tensordot(hidden, own[UP].astype(dtype), 1)
        y = y + (subspace_scale * branch).astype(y.dtype)
    return y


def fold(params) -> dict:
    """Params with each Affiner's scale and shift folded into its layer (``W·diag(1 + a)``,
    ``b̂ + b``); a branch, which cannot fold, stays as ``diffscaler/{down, up}``."""
    flat = dict(tree.flatten(params))
    for path in [p for p in flat if p.endswith(f"/{KEY}/{SCALE}")]:
        own = sites.parent(path)
        layer = sites.parent(own)
        scale, shift = flat.pop(path), flat.pop(sites.join(own, SHIFT))
        kernel, bias = sites.join(layer, "kernel"), sites.join(layer, "bias")
        # Output axes are the kernel's trailing axes: the scale broadcasts over them.
        flat[kernel] = (flat[kernel] * scale).astype(flat[kernel].dtype)
        flat[bias] = (flat[bias] + shift).astype(flat[bias].dtype)
    return tree.unflatten(flat)
