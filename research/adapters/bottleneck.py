"""Bottleneck adapters. Houlsby et al., 2019 ("Parameter-Efficient Transfer Learning for NLP"):
freeze the model and insert a small residual MLP, ``h ↦ h + up(act(down(h)))`` with ``down: d
→ m`` and ``up: m → d``, after the attention's output projection and after the MLP of every
block, inside the residual branch, so a post-LN block computes ``LN(x + a(sublayer(x)))`` (a
pre-LN block ``x + a(sublayer(LN(x)))``). Pfeiffer et al., 2021 ("AdapterFusion:
Non-Destructive Task Composition for Transfer Learning"; the default of their AdapterHub, 2020)
keep one adapter per block, after the MLP.

Both are one method (:class:`Bottleneck`) registered under two names, ``houlsby`` and
``pfeiffer``: the papers differ in where the adapters sit (and their nonlinearity), which is
each name's default ``targets``, while the rules stay free to pick other sites or blocks.
A site is a layer whose output the adapter maps: ``attn/out`` and ``mlp/wo`` (Llama's
``mlp/down``), intercepted through :mod:`research.sites`; the block then applies its dropout,
adds the residual and (post-LN) normalises. Houlsby's and AdapterHub's code apply that dropout
before the adapter instead (the block's dropout is no site): the same function whenever dropout
is off (evaluation, ``hidden_dropout=0``).

``up`` starts at zero (Houlsby draws it, like ``down``, from a truncated normal of std 0.01), so
the model is exactly unchanged at step 0 and the first step moves ``up``. The width is ``m =
d / reduction_factor`` (AdapterHub's default 16) or ``bottleneck``. Leaves sit under the site:
``encoder/layer_0/attn/out/adapter/{down,up}/{kernel,bias}``.

The adapter is nonlinear, so it cannot fold into the model's weights: :meth:`export` keeps it
beside the plain params, and only :meth:`Bottleneck.apply` runs it (the plain model ignores it).

Not AdapterHub's ``PfeifferConfig`` exactly: there the adapter reads the sublayer's output after
its residual sum and LayerNorm (``original_ln_before``) and the LayerNorm is applied again after
it (``original_ln_after``); here it is the Pfeiffer paper's placement with Houlsby's adapter,
the form the two papers share.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import sites, tree
from research.adapters.ssf import choose_modules, parse_rules
from research.lowrank.lora import DEFAULT_INPUT_AXES
from research.methods import Applied, Method, register

ADAPTER = "adapter"
OWN_PATTERN = rf"(.*/)?{ADAPTER}/(down|up)/(kernel|bias)"
NONLINEARITIES = {"relu": nn.relu, "gelu": functools.partial(nn.gelu, approximate=False),
                  "swish": nn.silu, "tanh": jnp.tanh}
ATTENTION_SITES = r"(.*/)?attn/out"
MLP_SITES = r"(.*/)?mlp/(wo|down)"


def _check_width(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.method.{key}={value!r} is not an integer >= 1")


@dataclasses.dataclass(frozen=True)
class Site:
    """What :meth:`Bottleneck.plan` decided for one layer: its path, output width and the
    adapter's bottleneck width."""
    path: str
    width: int
    bottleneck: int


@dataclasses.dataclass(frozen=True)
class Bottleneck(Method):
    """Bottleneck adapter options (``config.method = dict(name='houlsby' | 'pfeiffer', ...)``).

    targets: regexes, or ordered ``(regex, bool)`` rules (first match wins, so an exclusion of
        some blocks can precede a broad rule), over the module paths of layers whose output an
        adapter maps; default: ``houlsby`` attention output and MLP, ``pfeiffer`` MLP.
    reduction_factor: ``m = d / reduction_factor`` (must divide ``d``); ``bottleneck``, when
        given, is ``m`` itself and replaces it.
    nonlinearity: one of :data:`NONLINEARITIES` (``houlsby`` gelu, as in the paper's code;
        AdapterHub's Houlsby config uses swish; ``pfeiffer`` relu).
    init_scale: std of ``down``'s truncated normal (Houlsby's 0.01); ``up`` starts at zero.
    also_train: extra path regexes that train (a classifier head, Houlsby's layer norms);
        ``trainable``, when given, replaces the default (the adapters plus ``also_train``).
    input_axes: ``(regex, n)`` rules over kernel paths: how many leading kernel axes are inputs
        (default 1; the zoo's attention output has 2).
    """

    targets: tuple = (ATTENTION_SITES, MLP_SITES)
    reduction_factor: int = 16
    bottleneck: int | None = None
    nonlinearity: str = "gelu"
    init_scale: float = 1e-2
    also_train: tuple = ()
    input_axes: tuple = DEFAULT_INPUT_AXES

    label: ClassVar[str] = "bottleneck adapter"

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "targets", parse_rules(self.targets, f"{self.label} target rule"))
        _check_width("reduction_factor", self.reduction_factor)
        if self.bottleneck is not None:
            _check_width("bottleneck", self.bottleneck)
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"config.method.nonlinearity={self.nonlinearity!r} is not one of "
                             f"{sorted(NONLINEARITIES)}")
        # At 0 both factors would start at zero and neither would ever get a gradient.
        if not isinstance(self.init_scale, (int, float)) or self.init_scale <= 0:
            raise ValueError(f"config.method.init_scale={self.init_scale!r} is not a number "
                             f"> 0")
        set_(self, "also_train", tuple(self.also_train or ()))
        set_(self, "input_axes", tuple(tuple(r) if isinstance(r, list) else r
                                       for r in self.input_axes or ()))
        set_(self, "trainable", (OWN_PATTERN, *self.also_train)
             if self.trainable is None else tuple(self.trainable))

    def plan(self, params) -> dict[str, Site]:
        """``{layer path: Site}`` for ``params`` (arrays or shapes). A rule matching no layer, a
        layer with more than one output axis or a width the reduction factor does not divide is
        a one-line error."""
        flat = {p: v for p, v in tree.flatten(params).items() if f"/{ADAPTER}/" not in f"/{p}"}
        kernels = [p for p in flat if sites.leaf(p) == "kernel"]
        chosen = choose_modules(self.targets, [sites.parent(p) for p in kernels],
                                f"{self.label} target rule")
        kernel_paths = [sites.join(m, "kernel") for m in chosen]
        inputs = tree.resolve_rules(self.input_axes, kernel_paths, default=1,
                                    require_match=False)
        plan = {}
        for module, kernel in zip(chosen, kernel_paths):
            outputs = tuple(flat[kernel].shape)[int(inputs[kernel]):]
            if len(outputs) != 1:
                raise ValueError(f"{self.label} target {module} outputs {list(outputs)}; an "
                                 f"adapter maps a layer with one output axis (attn/out, mlp/wo)")
            width = outputs[0]
            if self.bottleneck is not None:
                size = self.bottleneck
            elif width % self.reduction_factor:
                raise ValueError(f"config.method.reduction_factor={self.reduction_factor} does "
                                 f"not divide the width {width} of {module}; pick a divisor or "
                                 f"set config.method.bottleneck")
            else:
                size = width // self.reduction_factor
            plan[module] = Site(module, width, size)
        return plan

    # --- the Method interface --------------------------------------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with an adapter at every site: ``down`` drawn, ``up`` and biases zero."""
        del stats
        flat = dict(tree.flatten(params))
        for index, site in enumerate(self.plan(params).values()):
            down = self.init_scale * jax.random.truncated_normal(
                jax.random.fold_in(rng, index), -2.0, 2.0, (site.width, site.bottleneck))
            prefix = sites.join(site.path, ADAPTER)
            flat[f"{prefix}/down/kernel"] = down
            flat[f"{prefix}/down/bias"] = jnp.zeros((site.bottleneck,), jnp.float32)
            flat[f"{prefix}/up/kernel"] = jnp.zeros((site.bottleneck, site.width), jnp.float32)
            flat[f"{prefix}/up/bias"] = jnp.zeros((site.width,), jnp.float32)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """The adapter's ``d`` axis takes its layer's output axis; the bottleneck is unsharded."""
        flat = dict(tree.flatten(logical))
        for site in self.plan(shapes).values():
            axes = tuple(flat.get(sites.join(site.path, "kernel")) or ())
            feature = axes[-1] if axes else None
            prefix = sites.join(site.path, ADAPTER)
            flat[f"{prefix}/down/kernel"] = (feature, None)
            flat[f"{prefix}/down/bias"] = (None,)
            flat[f"{prefix}/up/kernel"] = (None, feature)
            flat[f"{prefix}/up/bias"] = (feature,)
        return tree.unflatten(flat)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """``module.apply`` with every site's output passed through its adapter."""
        adapt = functools.partial(_adapt, activation=NONLINEARITIES[self.nonlinearity])
        with sites.intercept(adapt, sites.holding(ADAPTER)):
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """``params`` as they are: the adapters cannot fold into the plain model's weights."""
        return params


def _adapt(call: sites.Call, activation):
    h = call.output()
    adapter = jax.tree.map(lambda x: x.astype(h.dtype), call.param(ADAPTER))
    down, up = adapter["down"], adapter["up"]
    return h + activation(h @ down["kernel"] + down["bias"]) @ up["kernel"] + up["bias"]


@register("houlsby")
@dataclasses.dataclass(frozen=True)
class Houlsby(Bottleneck):
    """Houlsby et al.'s placement: after the attention output projection and after the MLP."""
    targets: tuple = (ATTENTION_SITES, MLP_SITES)
    nonlinearity: str = "gelu"
    label: ClassVar[str] = "houlsby"


@register("pfeiffer")
@dataclasses.dataclass(frozen=True)
class Pfeiffer(Bottleneck):
    """Pfeiffer et al.'s placement: after the MLP only, with a ReLU (AdapterHub's default)."""
    targets: tuple = (MLP_SITES,)
    nonlinearity: str = "relu"
    label: ClassVar[str] = "pfeiffer"
