"""S²FT (Yang et al., 2024, "S²FT: Efficient, Scalable and Generalizable LLM Fine-tuning by
Structured Sparsity"): select sparsely, compute densely. In every block a few attention heads
and FFN channels train, and only in the output projections (``attn/out``, ``mlp/wo`` or
``down``); everything else is frozen.

Heads and channels are coupled structures: permuting the heads axis of the query, key and value
kernels (and biases) together with the rows of ``attn/out``, or the columns of ``wi`` (``gate``
and ``up``) together with the rows of ``wo`` (``down``), leaves the function unchanged. So
:meth:`S2FT.init` co-permutes each block to put the selected units first: their rows of the
output kernel are one contiguous slice, kept as a leaf of its own beside the frozen kernel
(``.../attn/out/s2ft_kernel``), with the permutation beside the module
(``.../attn/s2ft_order``). :meth:`S2FT.apply` computes each adapted output projection as
``x[..., :s]·W_s2ft + x[..., s:]·W[s:] + b``: the weight gradient is the small dense matmul
``x[..., :s]ᵀ·g`` and no frozen kernel gets one (XLA drops those matmuls from the step).

With grouped-query attention a unit is a whole key/value group (the query heads sharing one
key/value head), the only permutation of heads that keeps the grouping. :func:`merge` writes the
trained slices back and undoes the permutations: a plain tree in the original order.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from research import tree
from research.methods import Applied, Method, register
from research.sites import Call, holding, intercept, parent

ROWS, ORDER = "s2ft_kernel", "s2ft_order"
ROWS_PATTERN = rf"(.*/)?{ROWS}"
SELECTIONS = ("random", "weight_norm")
CLASSIFIER = r"classifier/.*"  # a head from scratch trains; a pretrained LM head stays frozen


# ---------------------------------------------------------------------------------------------
# Coupled structures
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
    """One attention or MLP module: ``coupled`` lists ``(path, axis, unit)`` for every leaf
    whose ``axis`` holds the module's ``units`` in blocks of ``unit`` entries; ``output`` is the
    output projection's kernel, whose leading axis holds ``unit_rows`` rows per unit."""
    module: str
    kind: str  # "heads" or "channels": the option that sets its count
    coupled: tuple
    output: str
    units: int
    unit_rows: int

    @property
    def rows_path(self) -> str:
        return f"{parent(self.output)}{tree.SEP}{ROWS}"

    @property
    def order_path(self) -> str:
        return f"{self.module}{tree.SEP}{ORDER}"


def _inputs(flat, module: str, names, axis_units) -> list:
    coupled = []
    for name, unit in zip(names, axis_units):
        coupled.append((f"{module}/{name}/kernel", 1, unit))
        if f"{module}/{name}/bias" in flat:
            coupled.append((f"{module}/{name}/bias", 0, unit))
    return coupled


def sites(flat: Mapping) -> dict[str, Site]:
    """``{module path: Site}`` for every attention module (``query``, ``key``, ``value``,
    ``out``) and MLP (``wi``/``wo`` or ``gate``/``up``/``down``) of a flat tree."""
    found = {}
    for path in flat:
        owner = parent(parent(path))
        name = path.removeprefix(f"{owner}/") if owner else path
        if name == "out/kernel" and all(f"{owner}/{n}/kernel" in flat
                                        for n in ("query", "key", "value")):
            kv = flat[f"{owner}/key/kernel"].shape[1]
            groups = flat[f"{owner}/query/kernel"].shape[1] // kv
            coupled = _inputs(flat, owner, ("query", "key", "value"), (groups, 1, 1))
            found[owner] = Site(owner, "heads", (*coupled, (path, 0, groups)), path, kv,
                                 groups)
        inner = {"wo/kernel": ("wi",), "down/kernel": ("gate", "up")}.get(name)
        if inner and all(f"{owner}/{n}/kernel" in flat for n in inner):
            coupled = _inputs(flat, owner, inner, (1,) * len(inner))
            found[owner] = Site(owner, "channels", (*coupled, (path, 0, 1)), path,
                                 flat[path].shape[0], 1)
    return found


def _take_units(x, order, axis: int, unit: int):
    index = (order[:, None] * unit + jnp.arange(unit)).reshape(-1)
    return jnp.take(x, index, axis=axis)


def _permute(flat: dict, site: Site, order) -> None:
    for path, axis, unit in site.coupled:
        flat[path] = _take_units(flat[path], order, axis, unit)


def permute(params, orders: Mapping) -> dict:
    """``params`` with the units of each module reordered: ``orders`` maps a module path to a
    permutation of its units (new position -> old index). The function is unchanged."""
    flat = dict(tree.flatten(params))
    found = sites(flat)
    for module, order in orders.items():
        if module not in found:
            raise ValueError(f"S2FT: {module!r} is no attention or MLP module; closest: "
                             f"{', '.join(tree.closest_paths(module, found))}")
        _permute(flat, found[module], jnp.asarray(order))
    return tree.unflatten(flat)


def merge(params) -> dict:
    """The plain tree: each trained slice written into its kernel's leading rows, every
    permutation undone, the S²FT leaves dropped."""
    flat = dict(tree.flatten(params))
    found = sites(flat)
    for path in [p for p in flat if p.rpartition(tree.SEP)[2] == ORDER]:
        module = parent(path)
        if module not in found:
            raise ValueError(f"S2FT order {path!r} sits beside no attention or MLP module")
        site, order = found[module], flat.pop(path)
        if site.rows_path not in flat:
            raise ValueError(f"S2FT order {path!r} has no trained slice {site.rows_path!r}")
        rows = flat.pop(site.rows_path)
        flat[site.output] = jnp.asarray(flat[site.output]).at[:rows.shape[0]].set(rows)
        _permute(flat, site, jnp.argsort(order))
    orphans = [p for p in flat if p.rpartition(tree.SEP)[2] == ROWS]
    if orphans:
        raise ValueError(f"S2FT slice {orphans[0]!r} has no {ORDER} beside its module")
    return tree.unflatten(flat)


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


def _rules(option: str, value) -> tuple:
    """A number means every module; otherwise ``(regex, count or fraction)`` rules."""
    rules = ((r".*", value),) if isinstance(value, (int, float)) else tuple(
        tuple(rule) for rule in value)
    for pattern, amount in rules:
        ok = not isinstance(amount, bool) and (
            (isinstance(amount, int) and amount >= 0)
            or (isinstance(amount, float) and 0.0 < amount <= 1.0))
        if not ok:
            raise ValueError(f"S2FT {option}={amount!r} (rule {pattern!r}) is neither a count "
                             f"(int >= 0) nor a fraction in (0, 1]")
    return rules


@register("s2ft")
@dataclasses.dataclass(frozen=True)
class S2FT(Method):
    """S²FT options (``config.method = dict(name='s2ft', ...)``).

    heads: units trained per attention module: a count (int) or a fraction in (0, 1] of its
        heads (key/value groups under GQA), rounded, at least 1; or ``(regex, value)`` rules
        over attention module paths (``encoder/layer_0/attn``), first match wins, unmatched
        modules (or count 0) train none.
    channels: the same for the FFN channels of each MLP module (``encoder/layer_0/mlp``).
    selection: 'random' (the paper's default; reproducible from ``seed`` and the module path)
        or 'weight_norm' (the units whose output-projection rows have the largest L2 norm).
    also_train: extra path regexes that train whole; None (default): the classifier head where
        the model has one. ``trainable``, when given, replaces the default (the slices plus
        ``also_train``).
    """

    scannable: ClassVar[bool] = False  # its sites are keyed by layer path

    heads: object = 0.05
    channels: object = 0.05
    selection: str = "random"
    seed: int = 0
    also_train: tuple | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "heads", _rules("heads", self.heads))
        set_(self, "channels", _rules("channels", self.channels))
        if self.selection not in SELECTIONS:
            raise ValueError(f"S2FT selection={self.selection!r} is not one of {SELECTIONS}")
        if self.also_train is not None:
            set_(self, "also_train", tuple(self.also_train))
        if self.trainable is not None:
            set_(self, "trainable", tuple(self.trainable))

    def trainable_for(self, shapes: dict) -> tuple[str, ...]:
        if self.trainable is not None:
            return self.trainable
        also = self.also_train
        if also is None:
            paths = tree.flatten(shapes)
            also = (CLASSIFIER,) if any(re.fullmatch(CLASSIFIER, p) for p in paths) else ()
        return (ROWS_PATTERN, *also)

    def plan(self, params) -> dict[str, int]:
        """``{module path: units selected}`` for every module that trains (arrays or shapes)."""
        found = sites(tree.flatten(params))
        plan = {}
        for option, rules in (("heads", self.heads), ("channels", self.channels)):
            modules = [m for m, site in found.items() if site.kind == option]
            amounts = tree.resolve_rules(rules, modules, default=0, what=f"S2FT {option} rule")
            for module, amount in amounts.items():
                units = found[module].units
                count = max(1, round(amount * units)) if isinstance(amount, float) else amount
                if count > units:
                    what = "key/value groups" if found[module].unit_rows > 1 else option
                    raise ValueError(f"S2FT {option}={amount} for {module} exceeds its "
                                     f"{units} {what}")
                if count:
                    plan[module] = count
        return plan

    def _order(self, site: Site, flat: dict, count: int):
        """The module's permutation: the selected units first, each part in original order."""
        if self.selection == "random":
            rng = np.random.default_rng([self.seed, zlib.crc32(site.module.encode())])
            chosen = np.zeros(site.units, bool)
            chosen[rng.choice(site.units, count, replace=False)] = True
        else:
            norms = jnp.linalg.norm(flat[site.output].reshape(site.units, -1), axis=1)
            chosen = jnp.zeros(site.units, bool).at[jax.lax.top_k(norms, count)[1]].set(True)
        return jnp.argsort(~jnp.asarray(chosen), stable=True).astype(jnp.int32)

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` co-permuted, with each trained slice and permutation added."""
        del rng, stats
        flat = dict(tree.flatten(params))
        held = [p for p in flat if p.rpartition(tree.SEP)[2] in (ROWS, ORDER)]
        if held:
            raise ValueError(f"S2FT.init: params already hold {held[0]!r}; merge them first")
        found = sites(flat)
        for module, count in self.plan(flat).items():
            site = found[module]
            order = self._order(site, flat, count)
            _permute(flat, site, order)
            flat[site.order_path] = order
            flat[site.rows_path] = flat[site.output][:count * site.unit_rows]
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """A slice has its kernel's axes; a permutation none."""
        flat_logical = dict(tree.flatten(logical))
        for path in tree.flatten(shapes):
            name = path.rpartition(tree.SEP)[2]
            if name == ROWS:
                flat_logical[path] = flat_logical[f"{parent(path)}/kernel"]
            elif name == ORDER:
                flat_logical[path] = (None,)
        return tree.unflatten(flat_logical)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        with intercept(_with_slice, holding(ROWS)):
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        return merge(params)


def _with_slice(call: Call):
    rows, kernel = call.param(ROWS), call.param("kernel")
    n_in, dtype = call.input_axes, call.dtype(kernel)
    x, s = call.inputs.astype(dtype), rows.shape[0]
    axis = x.ndim - n_in
    # Two matmuls rather than one over [W_s2ft; W[s:]]: the weight gradient then is
    # x[..., :s]ᵀ·g alone, never the full one sliced afterwards.
    y = (jnp.tensordot(jax.lax.slice_in_dim(x, 0, s, axis=axis), rows.astype(dtype), n_in)
         + jnp.tensordot(jax.lax.slice_in_dim(x, s, x.shape[axis], axis=axis),
                         kernel[s:].astype(dtype), n_in))
    if call.has("bias"):
        y = y + call.param("bias").astype(dtype)
    return y
