"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): freeze ``W``
and learn a low-rank update, computing ``x·W + s·(x·A)·B`` with ``s = alpha / r`` (or
``alpha / sqrt(r)``, rsLoRA, Kalajdzievski 2023).

As a tree transform: :meth:`LoRA.init` adds two factor leaves beside each chosen kernel or
embedding table (``.../query/kernel`` gets ``.../query/lora_a`` and ``.../query/lora_b``).
The layout is uniform: ``A`` has the kernel's input axes plus the rank, ``B`` the rank plus the
output axes, so ``tensordot(A, B, 1)`` has the kernel's shape (Dense ``[in, r] · [r, out]``;
query ``[embed, r] · [r, heads, head_dim]``; attention out ``[heads, head_dim, r] · [r, embed]``;
embedding ``[vocab, r] · [r, embed]``). :meth:`LoRA.apply` intercepts the ``__call__`` of every
``nn.Dense``, ``MultiAxisDense`` and ``nn.Embed`` holding factors and adds the low-rank path to
its output; it never forms ``W + s·A·B`` in the step, and since the loop differentiates only the
trainable tree, a frozen kernel gets no weight gradient (XLA drops that matmul: a LoRA step
costs about 2/3 of a full fine-tuning step's FLOPs).

:func:`merge` folds the update into the base weights, :func:`unmerge` takes it out again and
:func:`lora_factors` returns the adapter alone; all three are pure functions over trees.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import tree
from research.methods import Method
from research.models.layers import MultiAxisDense

A, B = "lora_a", "lora_b"
FACTOR_PATTERN = r"(.*/)?lora_(a|b)"
TARGET_LEAVES = ("kernel", "embedding")  # the leaves a target rule may select
# How many leading axes of a kernel are its input. The zoo's attention output kernel is
# [heads, head_dim, embed]; every other kernel (and embedding table) has one input axis.
DEFAULT_INPUT_AXES = ((r"(.*/)?attn/out/kernel", 2),)
INITS = ("kaiming_uniform", "gaussian")


# ---------------------------------------------------------------------------------------------
# Paths of factor pairs
# ---------------------------------------------------------------------------------------------


def _parent(path: str) -> str:
    return path.rpartition(tree.SEP)[0]


def _join(parent: str, name: str) -> str:
    return f"{parent}{tree.SEP}{name}" if parent else name


@dataclasses.dataclass(frozen=True)
class Pair:
    """One adapted leaf: the base ``target`` (kernel or embedding) and its two factors."""
    target: str
    a: str
    b: str

    @property
    def module(self) -> str:
        return _parent(self.target)

    @property
    def embedding(self) -> bool:
        return self.target.rpartition(tree.SEP)[2] == "embedding"


def factor_pairs(flat: Mapping[str, Any]) -> dict[str, Pair]:
    """``{target path: Pair}`` for every ``lora_a`` in a flat tree. A factor without its
    partner or without a kernel/embedding beside it is an error naming the path."""
    pairs = {}
    for path in flat:
        parent, _, name = path.rpartition(tree.SEP)
        if name not in (A, B):
            continue
        partner = _join(parent, B if name == A else A)
        if partner not in flat:
            raise ValueError(f"LoRA factor {path!r} has no partner {partner!r}")
        targets = [_join(parent, leaf) for leaf in TARGET_LEAVES if _join(parent, leaf) in flat]
        if len(targets) != 1:
            raise ValueError(f"LoRA factor {path!r} needs exactly one of "
                             f"{'/'.join(TARGET_LEAVES)} beside it; found {targets}")
        if name == A:
            pairs[targets[0]] = Pair(targets[0], path, partner)
    return pairs


def _strip_factors(flat: Mapping[str, Any]) -> dict[str, Any]:
    return {p: v for p, v in flat.items() if p.rpartition(tree.SEP)[2] not in (A, B)}


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """What :meth:`LoRA.plan` decided for one kernel or embedding table."""
    path: str
    rank: int
    alpha: float
    scale: float
    input_axes: int
    shape: tuple


def _tuples(rules) -> tuple:
    return tuple(tuple(rule) if isinstance(rule, list) else rule for rule in (rules or ()))


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """LoRA options (``config.method = dict(name='lora', ...)``).

    targets: ordered ``(regex, rank)`` rules over kernel and embedding paths, first match wins;
        rank 0 (or None) leaves a matched path alone, so an exclusion can precede a broad rule.
    alpha: the scale numerator (PEFT's ``lora_alpha``, default 8 as there);
        ``alpha_rules`` are ``(regex, alpha)`` rules over the targets (PEFT's ``alpha_pattern``).
    rslora: scale ``alpha / sqrt(r)`` instead of ``alpha / r``.
    init_a: 'kaiming_uniform' (PEFT's default, U(±1/sqrt(fan_in))) or 'gaussian' (N(0, 1/r));
        B starts at zero. Embedding tables follow PEFT instead: A = 0, B ~ N(0, 1).
    dropout: dropout on the input of the low-rank path while training ('dropout' rng).
    also_train: extra path regexes that train (a classifier head, say); ``trainable``, when
        given, replaces the default (the factors plus ``also_train``).
    input_axes: ``(regex, n)`` rules saying how many leading kernel axes are inputs (default 1).
    """

    targets: tuple = ()
    alpha: float = 8.0
    alpha_rules: tuple = ()
    rslora: bool = False
    init_a: str = "kaiming_uniform"
    dropout: float = 0.0
    also_train: tuple = ()
    input_axes: tuple = DEFAULT_INPUT_AXES

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("targets", "alpha_rules", "input_axes"):
            set_(self, name, _tuples(getattr(self, name)))
        set_(self, "also_train", tuple(self.also_train or ()))
        if not self.targets:
            raise ValueError("LoRA needs targets: (regex, rank) rules over kernel paths")
        for pattern, rank in self.targets:
            if rank is not None and (not isinstance(rank, int) or rank < 0):
                raise ValueError(f"LoRA target rule {pattern!r}: rank {rank!r} is not a "
                                 f"non-negative integer")
        if self.init_a not in INITS:
            raise ValueError(f"LoRA init_a={self.init_a!r} is not one of {INITS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r} is not in [0, 1)")
        if self.trainable is None:
            set_(self, "trainable", (FACTOR_PATTERN, *self.also_train))
        else:
            set_(self, "trainable", tuple(self.trainable))

    # --- which leaves, which ranks ---------------------------------------------------------

    def scale_for(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def plan(self, params) -> dict[str, Target]:
        """``{kernel or embedding path: Target}`` for ``params`` (arrays or shapes). Rules that
        match nothing, ranks too large and unknown layouts are one-line errors."""
        flat = _strip_factors(tree.flatten(params))
        candidates = [p for p in flat if p.rpartition(tree.SEP)[2] in TARGET_LEAVES]
        ranks = tree.resolve_rules(self.targets, candidates, what="LoRA target rule")
        chosen = [p for p in candidates if ranks[p]]
        alphas = tree.resolve_rules(self.alpha_rules, chosen, default=self.alpha,
                                    what="LoRA alpha rule")
        inputs = tree.resolve_rules(self.input_axes, chosen, default=1, require_match=False)
        plan = {}
        for path in chosen:
            shape, rank = tuple(flat[path].shape), ranks[path]
            n_in = 1 if path.endswith("embedding") else int(inputs[path])
            if not 0 < n_in < len(shape):
                raise ValueError(f"LoRA target {path} {shape}: {n_in} input axes leave no "
                                 f"output axis")
            fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
            if rank > min(fan_in, fan_out):
                raise ValueError(f"LoRA rank {rank} for {path} exceeds its smaller side: "
                                 f"{shape} is {fan_in} (inputs {shape[:n_in]}) x {fan_out} "
                                 f"(outputs {shape[n_in:]})")
            alpha = float(alphas[path])
            plan[path] = Target(path, rank, alpha, self.scale_for(rank, alpha), n_in, shape)
        return plan

    def scales(self, params) -> dict:
        """Scale tree: ``s`` at each adapted kernel/embedding path (rank read off the factors
        present in ``params``, alpha from the rules)."""
        pairs = factor_pairs(tree.flatten(params))
        flat = tree.flatten(params)
        alphas = tree.resolve_rules(self.alpha_rules, list(pairs), default=self.alpha,
                                    what="LoRA alpha rule")
        return tree.unflatten({path: self.scale_for(int(flat[pair.a].shape[-1]),
                                                    float(alphas[path]))
                               for path, pair in pairs.items()})

    def factors(self, params) -> tuple[dict, dict]:
        return lora_factors(params, self)

    # --- the Method interface --------------------------------------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with factors beside every target (factors already present are kept)."""
        del stats
        flat = dict(tree.flatten(params))
        for index, target in enumerate(self.plan(params).values()):
            kernel, r, n_in = flat[target.path], target.rank, target.input_axes
            module = _parent(target.path)
            a_path, b_path = _join(module, A), _join(module, B)
            a_shape, b_shape = (*target.shape[:n_in], r), (r, *target.shape[n_in:])
            if a_path in flat or b_path in flat:
                have = tuple(getattr(flat.get(a_path), "shape", ())), \
                    tuple(getattr(flat.get(b_path), "shape", ()))
                if have != (a_shape, b_shape):
                    raise ValueError(f"LoRA factors at {module} have shapes {have}; "
                                     f"{target.path} {target.shape} at rank {r} needs "
                                     f"{(a_shape, b_shape)}")
                continue
            key = jax.random.fold_in(rng, index)
            dtype = kernel.dtype
            if target.path.endswith("embedding"):
                a = jnp.zeros(a_shape, dtype)  # PEFT's choice for embedding tables
                b = jax.random.normal(key, b_shape, dtype)
            else:
                if self.init_a == "kaiming_uniform":
                    # torch kaiming_uniform_(a=sqrt(5)) on lora_A [r, fan_in]: U(±1/sqrt(fan_in))
                    bound = 1.0 / math.sqrt(math.prod(a_shape[:-1]))
                    a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
                else:
                    a = jax.random.normal(key, a_shape, dtype) / r
                b = jnp.zeros(b_shape, dtype)
            flat[a_path], flat[b_path] = a, b
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """A takes the kernel's input axes, B its output axes; the rank axis has no name."""
        flat_logical, flat_shapes = dict(tree.flatten(logical)), tree.flatten(shapes)
        for path, pair in factor_pairs(flat_shapes).items():
            ndim = len(flat_shapes[path].shape)
            axes = tuple(flat_logical.get(path) or ())
            axes = axes + (None,) * (ndim - len(axes))
            n_in = len(flat_shapes[pair.a].shape) - 1
            flat_logical[pair.a] = (*axes[:n_in], None)
            flat_logical[pair.b] = (None, *axes[n_in:])
        return tree.unflatten(flat_logical)

    def apply(self, module, variables, *args, **kwargs):
        """``module.apply`` with the low-rank path added at every adapted layer. Dropout on
        that path is on when the call passes ``deterministic=False``."""
        flat_scales = tree.flatten(self.scales(variables["params"]))
        by_module = {_parent(path): s for path, s in flat_scales.items()}
        training = kwargs.get("deterministic", True) is False
        rate = self.dropout if training else 0.0
        with nn.intercept_methods(_interceptor(by_module, rate)):
            return module.apply(variables, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# The low-rank path at each adapted layer
# ---------------------------------------------------------------------------------------------


def _first_input(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def _interceptor(scales: dict[str, float], rate: float):
    def intercept(next_fun, args, kwargs, context):
        layer = context.module
        if context.method_name != "__call__" or not layer.has_variable("params", A):
            return next_fun(*args, **kwargs)
        path = tree.SEP.join(layer.path)
        a = layer.get_variable("params", A)
        b = layer.get_variable("params", B)
        inputs = _first_input(args, kwargs)
        y = next_fun(*args, **kwargs)
        scale = scales[path]
        if isinstance(layer, nn.Embed):
            dtype = layer.dtype or a.dtype
            rows = jnp.take(a, inputs, axis=0).astype(dtype)
            delta = jnp.tensordot(rows * scale, b.astype(dtype), 1)
            return y + delta.astype(y.dtype)
        if isinstance(layer, nn.Dense):
            n_in, dtype = 1, layer.dtype or jnp.result_type(inputs, a)
        elif isinstance(layer, MultiAxisDense):
            kernel = layer.get_variable("params", "kernel")
            n_in, dtype = kernel.ndim - len(layer.features), layer.config.compute_dtype
        else:
            raise ValueError(f"LoRA factors at {path} sit in a {type(layer).__name__}; LoRA "
                            f"adapts nn.Dense, MultiAxisDense and nn.Embed")
        if a.ndim - 1 != n_in:
            raise ValueError(f"LoRA factor {path}/{A} {a.shape} has {a.ndim - 1} input axes; "
                             f"the layer's kernel has {n_in} (set LoRA input_axes)")
        x = inputs.astype(dtype)
        if rate:
            keep = jax.random.bernoulli(layer.make_rng("dropout"), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), jnp.zeros((), dtype))
        delta = low_rank(x, a.astype(dtype), b.astype(dtype), n_in, float(scale))
        return y + delta.astype(y.dtype)
    return intercept


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def low_rank(x, a, b, input_axes: int, scale: float):
    """``scale · (x ·A) ·B``, contracting the last ``input_axes`` axes of ``x`` with A.

    The backward pass is written out as 2-D matmuls over the flattened tokens. Mathematically
    it is what autodiff gives, but XLA:CPU compiles autodiff's weight gradients (a transposed
    dot after a transposing copy of the output gradient) about 3x slower; written this way the
    whole LoRA layer's backward runs at matmul speed."""
    return _low_rank_fwd(x, a, b, input_axes, scale)[0]


def _low_rank_fwd(x, a, b, input_axes, scale):
    hidden = jnp.tensordot(x, a, input_axes) * scale
    return jnp.tensordot(hidden, b, 1), (x, a, b, hidden)


def _low_rank_bwd(input_axes, scale, residuals, grad):
    del input_axes
    x, a, b, hidden = residuals
    rank = a.shape[-1]
    tokens = hidden.size // rank
    x2, h2, g2 = x.reshape(tokens, -1), hidden.reshape(tokens, rank), grad.reshape(tokens, -1)
    db = jnp.einsum("tr,to->ro", h2, g2)
    gh = jnp.einsum("to,ro->tr", g2, b.reshape(rank, -1)) * scale
    da = jnp.einsum("ti,tr->ir", x2, gh)
    dx = jnp.einsum("tr,ir->ti", gh, a.reshape(-1, rank))
    return (dx.reshape(x.shape).astype(x.dtype), da.reshape(a.shape).astype(a.dtype),
            db.reshape(b.shape).astype(b.dtype))


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


# ---------------------------------------------------------------------------------------------
# Pure functions over trees: merge, unmerge, the adapter alone
# ---------------------------------------------------------------------------------------------


def _scale_map(scales, params, pairs) -> dict[str, float]:
    """``{target path: s}`` from a LoRA method, a scale tree or one number."""
    if isinstance(scales, LoRA):
        flat = tree.flatten(scales.scales(params))
    elif isinstance(scales, Mapping):
        flat = tree.flatten(scales)
    else:
        flat = {path: scales for path in pairs}
    missing = [p for p in pairs if p not in flat]
    if missing:
        raise ValueError(f"no LoRA scale for {missing[0]!r}; scales cover "
                         f"{', '.join(tree.closest_paths(missing[0], flat)) or 'nothing'}")
    return flat


def _delta(pair: Pair, flat, scale):
    a, b = flat[pair.a], flat[pair.b]
    return scale * jnp.tensordot(a, b, 1, precision=jax.lax.Precision.HIGHEST)


def merge(params, scales) -> dict:
    """Fold ``W + s·A·B`` into each adapted leaf and drop the factors. ``scales``: the LoRA
    method, a scale tree (``s`` at each adapted path) or one number."""
    flat = dict(tree.flatten(params))
    pairs = factor_pairs(flat)
    s = _scale_map(scales, params, pairs)
    for path, pair in pairs.items():
        weight = flat[path]
        flat[path] = (weight + _delta(pair, flat, s[path])).astype(weight.dtype)
        del flat[pair.a], flat[pair.b]
    return tree.unflatten(flat)


def unmerge(merged, factors, scales) -> dict:
    """Inverse of :func:`merge`: ``W - s·A·B`` at each adapted leaf, factors put back.
    ``factors`` is the adapter tree (from :func:`lora_factors`); ``scales`` as in merge."""
    flat, flat_factors = dict(tree.flatten(merged)), tree.flatten(factors)
    clash = [p for p in flat_factors if p in flat]
    if clash:
        raise ValueError(f"{clash[0]!r} is already in the merged tree")
    combined = {**flat, **flat_factors}
    pairs = {path: pair for path, pair in factor_pairs(combined).items()
             if pair.a in flat_factors}
    s = _scale_map(scales, tree.unflatten(combined), pairs)
    for path, pair in pairs.items():
        weight = flat[path]
        delta = _delta(pair, flat_factors, s[path])
        if delta.shape != weight.shape:
            raise ValueError(f"LoRA factors for {path} make {delta.shape}; the leaf is "
                             f"{weight.shape}")
        flat[path] = (weight - delta).astype(weight.dtype)
        flat[pair.a], flat[pair.b] = flat_factors[pair.a], flat_factors[pair.b]
    return tree.unflatten(flat)


def lora_factors(params, scales) -> tuple[dict, dict]:
    """``(adapter, scale tree)``: only the factor leaves, and ``s`` at each adapted path.
    ``scales``: the LoRA method (usual), a scale tree or one number."""
    flat = tree.flatten(params)
    pairs = factor_pairs(flat)
    s = _scale_map(scales, params, pairs)
    adapter = {p: flat[p] for pair in pairs.values() for p in (pair.a, pair.b)}
    return tree.unflatten(adapter), tree.unflatten({path: s[path] for path in pairs})
