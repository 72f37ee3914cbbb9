"""SSF (Lian et al., 2022, "Scaling & Shifting Your Features: A New Baseline for Efficient Model
Tuning"): freeze the model and learn, after chosen operations, a per-channel scale ``γ`` and
shift ``β`` of their outputs, ``y ↦ γ⊙y + β``.

The paper puts them after every operation of a ViT block (both LayerNorms, the attention's
projections, the MLP's two linear layers, the latter before its nonlinearity); here a target is
any layer or norm with a bias (``nn.Dense``, ``MultiAxisDense``, ``nn.Conv``, LayerNorm), picked
by regex rules over module paths (``encoder/layer_0/attn/query``, ``encoder/layer_0/attn_norm``),
and ``γ``, ``β`` have the shape of its bias (the query's ``[heads, head_dim]`` is the paper's
per-channel vector of the fused qkv, split). :meth:`SSF.init` puts ``ssf_scale = 1`` and
``ssf_shift = 0`` beside the bias, so the model is unchanged at step 0 (``init_std`` draws them
around those values instead, as the released code does with 0.02).

The re-parameterisation that makes SSF free at inference: a layer ``y = W·x + b`` followed by
``γ⊙y + β`` is the layer ``W·diag(γ), γ⊙b + β``, and a norm ``n⊙s + b`` the norm ``s⊙γ, γ⊙b +
β``; :meth:`SSF.export` folds every pair so. A target without a bias could not take its shift,
so it is refused.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from research import sites, tree
from research.methods import Applied, Method, register

SCALE, SHIFT = "ssf_scale", "ssf_shift"
OWN_PATTERN = rf"(.*/)?({SCALE}|{SHIFT})"
WEIGHTS = ("kernel", "scale")  # a layer's and a norm's multiplicative leaf: what γ folds into
# Every linear layer and both norms of each block (bias-free models have no place for β).
DEFAULT_TARGETS = (r"(.*/)?layer_\d+/(attn/(query|key|value|out)|mlp/(wi|wo))",
                   r"(.*/)?layer_\d+/(attn|mlp)_norm")


def parse_rules(rules, what: str) -> tuple:
    """``tree.choice_rules``, and at least one of them."""
    out = tree.choice_rules(rules, what)
    if not out:
        raise ValueError(f"{what}s are empty: give regexes over module paths")
    return out


def choose_modules(rules: tuple, modules: list[str], what: str) -> list[str]:
    """The modules the first matching rule chooses; a rule matching no module is an error."""
    chosen = tree.resolve_rules(rules, modules, default=False, what=what)
    return [m for m in modules if chosen[m]]


def require_bias(flat: dict, module: str, method: str) -> tuple:
    """The shape of ``module``'s bias: where a shift folds."""
    bias = sites.join(module, "bias")
    if bias not in flat:
        raise ValueError(f"{method} target {module} has no bias, so its shift could not fold "
                         f"into the plain model; target layers and LayerNorms with a bias")
    return tuple(flat[bias].shape)


@register("ssf")
@dataclasses.dataclass(frozen=True)
class SSF(Method):
    """SSF options (``config.method = dict(name='ssf', ...)``).

    targets: regexes, or ordered ``(regex, bool)`` rules (first match wins), over the module
        paths of layers (holding a ``kernel``) and norms (holding a ``scale``); default every
        linear layer and norm of every block.
    init_std: ``γ ~ N(1, init_std)``, ``β ~ N(0, init_std)``; 0 (default) starts exactly at the
        identity, the paper's code uses 0.02.
    also_train: extra path regexes that train (a classifier head); ``trainable``, when given,
        replaces the default (the scales and shifts plus ``also_train``).
    """

    targets: tuple = DEFAULT_TARGETS
    init_std: float = 0.0
    also_train: tuple = ()

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "targets", parse_rules(self.targets, "SSF target rule"))
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            raise ValueError(f"config.method.init_std={self.init_std!r} is not a number >= 0")
        set_(self, "also_train", tuple(self.also_train or ()))
        set_(self, "trainable", (OWN_PATTERN, *self.also_train)
             if self.trainable is None else tuple(self.trainable))

    def plan(self, params) -> dict[str, tuple]:
        """``{module path: shape of its γ and β}`` for ``params`` (arrays or shapes)."""
        flat = {p: v for p, v in tree.flatten(params).items()
                if sites.leaf(p) not in (SCALE, SHIFT)}
        modules = sorted({sites.parent(p) for p in flat if sites.leaf(p) in WEIGHTS})
        chosen = choose_modules(self.targets, modules, "SSF target rule")
        return {m: require_bias(flat, m, "SSF") for m in chosen}

    # --- the Method interface --------------------------------------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with ``ssf_scale`` and ``ssf_shift`` beside every target's bias."""
        del stats
        flat = dict(tree.flatten(params))
        for index, (module, shape) in enumerate(self.plan(params).items()):
            scale, shift = jnp.ones(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
            if self.init_std:
                noise = jax.random.normal(jax.random.fold_in(rng, index), (2, *shape))
                scale, shift = scale + self.init_std * noise[0], shift + self.init_std * noise[1]
            flat[sites.join(module, SCALE)] = scale
            flat[sites.join(module, SHIFT)] = shift
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """``γ`` and ``β`` shard like the bias they sit beside."""
        flat = dict(tree.flatten(logical))
        for module in self.plan(shapes):
            axes = flat.get(sites.join(module, "bias"))
            flat[sites.join(module, SCALE)] = flat[sites.join(module, SHIFT)] = axes
        return tree.unflatten(flat)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """``module.apply`` with every target's output scaled and shifted."""
        with sites.intercept(_scale_and_shift, sites.holding(SCALE, SHIFT)):
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """The plain model computing the same function (:func:`fold`)."""
        return fold(params)


def _scale_and_shift(call: sites.Call):
    y = call.output()
    return y * call.param(SCALE).astype(y.dtype) + call.param(SHIFT).astype(y.dtype)


def fold(params) -> dict:
    """Plain params: every ``γ, β`` folded into the layer or norm before it (weight times
    ``γ`` over its output axes, bias ``γ⊙b + β``)."""
    flat = dict(tree.flatten(params))
    for path in [p for p in flat if sites.leaf(p) == SCALE]:
        module = sites.parent(path)
        scale, shift = flat.pop(path), flat.pop(sites.join(module, SHIFT))
        weight = next(sites.join(module, w) for w in WEIGHTS if sites.join(module, w) in flat)
        bias = sites.join(module, "bias")
        # Output axes are a layer's trailing axes (Dense, MultiAxisDense, Conv): γ broadcasts.
        flat[weight] = (flat[weight] * scale).astype(flat[weight].dtype)
        flat[bias] = (flat[bias] * scale + shift).astype(flat[bias].dtype)
    return tree.unflatten(flat)

