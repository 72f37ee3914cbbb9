"""Bottleneck adapters. Houlsby et al., 2019 ("Parameter-Efficient Transfer Learning for NLP"):
freeze the model and insert a small residual MLP, ``h ↦ h + up(act(down(h)))`` with ``down: d
→ m`` and ``up: m → d``, after the attention's output projection and after the MLP of every
block, inside the residual branch, so a post-LN block computes ``LN(x + a(sublayer(x)))`` (a
pre-LN block ``x + a(sublayer(LN(x)))``). Pfeiffer et al., 2021 ("AdapterFusion:
Non-Destructive Task Composition for Transfer Learning"; the default of their AdapterHub, 2020)
keep one adapter per block, after the MLP. Both are *sequential*; a *parallel* adapter (He et
al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"; compared with the
sequential ones for audio transformers by Cappellazzo et al., 2023) reads the sublayer's input
instead and adds its output beside the sublayer's: ``f(x) + s·up(act(down(x)))``, so a post-LN
block computes ``LN(x + f(x) + a(x))`` and a pre-LN block ``x + f(LN x) + a(LN x)``.

Both are one method (:class:`Bottleneck`) registered under two names, ``houlsby`` and
``pfeiffer``: the papers differ in where the adapters sit (and their nonlinearity), which is
each name's default ``targets``, while the rules stay free to pick other sites or blocks.
A site is a layer whose output the adapter maps: ``attn/out`` and ``mlp/wo`` (Llama's
``mlp/down``), intercepted through :mod:`research.sites`; the block then applies its dropout,
adds the residual and (post-LN) normalises. Houlsby's and AdapterHub's code apply that dropout
before the adapter instead (the block's dropout is no site): the same function whenever dropout
is off (evaluation, ``hidden_dropout=0``).

``placement`` picks sequential (default) or parallel; the sites stay the sublayers' output
projections either way (a parallel adapter's params sit there too), and ``scaling`` is ``s``
(He et al. use 4 for a parallel adapter beside the MLP; 1 keeps Houlsby's sequential form).

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

import contextlib
import dataclasses
import functools
import re
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import sites, tree
from research.adapters.ssf import choose_modules, parse_rules
from research.lowrank.lora import DEFAULT_INPUT_AXES
from research.models.layers import Attention, Mlp
from research.methods import Applied, Method, register

ADAPTER = "adapter"
OWN_PATTERN = rf"(.*/)?{ADAPTER}/(down|up)/(kernel|bias)"
NONLINEARITIES = {"relu": nn.relu, "gelu": functools.partial(nn.gelu, approximate=False),
                  "swish": nn.silu, "tanh": jnp.tanh}
ATTENTION_SITES = r"(.*/)?attn/out"
MLP_SITES = r"(.*/)?mlp/(wo|down)"
PLACEMENTS = ("sequential", "parallel")
# A parallel adapter reads its sublayer's input: the site must be that sublayer's output layer.
SUBLAYER_OUTPUTS = rf"{ATTENTION_SITES}|{MLP_SITES}"


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
    placement: ``sequential`` (the adapter maps the site's output) or ``parallel`` (it maps
        the site's sublayer's input and adds beside the site's output).
    scaling: ``s``, the factor on the adapter's output.
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
    placement: str = "sequential"
    scaling: float = 1.0
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
        if self.placement not in PLACEMENTS:
            raise ValueError(f"config.method.placement={self.placement!r} is not one of "
                             f"{list(PLACEMENTS)}")
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise ValueError(f"config.method.scaling={self.scaling!r} is not a number")
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
            if self.placement == "parallel" and not re.fullmatch(SUBLAYER_OUTPUTS, module):
                raise ValueError(f"{self.label} target {module} is no sublayer's output layer; "
                                 f"a parallel adapter sits beside an attention or MLP sublayer, "
                                 f"at attn/out, mlp/wo or mlp/down")
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
        """``module.apply`` with every site's output passed through its adapter (sequential)
        or added to its adapter of the sublayer's input (parallel)."""
        parallel = self.placement == "parallel"
        sublayer_inputs = {}
        adapt = functools.partial(_adapt, activation=NONLINEARITIES[self.nonlinearity],
                                  scaling=self.scaling,
                                  sublayer_inputs=sublayer_inputs if parallel else None)
        record = (sites.intercept(functools.partial(_record_input, sublayer_inputs),
                                  lambda layer: isinstance(layer, (Attention, Mlp)))
                  if parallel else contextlib.nullcontext())
        with sites.intercept(adapt, sites.holding(ADAPTER)), record:
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """``params`` as they are: the adapters cannot fold into the plain model's weights."""
        return params


def _record_input(inputs: dict, call: sites.Call):
    """Keep a sublayer's input under its path while it runs (its output layer reads it)."""
    inputs[call.path] = call.inputs
    return call.output()


def _adapt(call: sites.Call, activation, scaling: float, sublayer_inputs: dict | None):
    """Sequential: ``h + s·a(h)`` on the site's output ``h``. Parallel: ``h + s·a(x)`` with
    ``x`` the sublayer's input, cut to ``h``'s rows (a [CLS]-only last block)."""
    h = call.output()
    adapter = jax.tree.map(lambda x: x.astype(h.dtype), call.param(ADAPTER))
    down, up = adapter["down"], adapter["up"]
    x = h
    if sublayer_inputs is not None:
        x = sublayer_inputs[sites.parent(call.path)][:, :h.shape[1]].astype(h.dtype)
    return h + scaling * (activation(x @ down["kernel"] + down["bias"]) @ up["kernel"]
                          + up["bias"])


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
