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

``init_weights`` picks how the factors start: randomly (``B = 0``, PEFT's default), or from the
pretrained kernel itself with PiSSA, OLoRA or CorDA (:mod:`research.lowrank.init`), which move
a part of ``W`` into the factors and leave the residual in the frozen kernel, so the model is
unchanged at step 0. CorDA orients that split by each target's input covariance, which
:meth:`LoRA.calibrate` measures on a few training batches.

:func:`merge` folds the update into the base weights, :func:`unmerge` takes it out again and
:func:`lora_factors` returns the adapter alone; all three are pure functions over trees.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import sites, tree
from research.lowrank import init as init_lib
from research.methods import Applied, Method, register, training
from research.models.dropout import dropout

A, B = "lora_a", "lora_b"
FACTOR_PATTERN = r"(.*/)?lora_(a|b)"
TARGET_LEAVES = ("kernel", "embedding")  # the leaves a target rule may select
# How many leading axes of a kernel are its input. The zoo's attention output kernel is
# [heads, head_dim, embed]; every other kernel (and embedding table) has one input axis.
DEFAULT_INPUT_AXES = ((r"(.*/)?attn/out/kernel", 2),)
RANDOM_INITS = ("kaiming_uniform", "gaussian")
WEIGHT_INITS = ("pissa", "olora", "corda_ipm", "corda_kpm")  # factors taken out of W itself
INITS = RANDOM_INITS + WEIGHT_INITS
DEFAULT_CALIBRATION_BATCHES = 8  # CorDA's covariance: 8 batches of training inputs


# ---------------------------------------------------------------------------------------------
# Paths of factor pairs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pair:
    """One adapted leaf: the base ``target`` (kernel or embedding) and its two factors."""
    target: str
    a: str
    b: str

    @property
    def module(self) -> str:
        return sites.parent(self.target)

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
        partner = sites.join(parent, B if name == A else A)
        if partner not in flat:
            raise ValueError(f"LoRA factor {path!r} has no partner {partner!r}")
        targets = [sites.join(parent, leaf) for leaf in TARGET_LEAVES if sites.join(parent, leaf) in flat]
        if len(targets) != 1:
            raise ValueError(f"LoRA factor {path!r} needs exactly one of "
                             f"{'/'.join(TARGET_LEAVES)} beside it; found {targets}")
        if name == A:
            pairs[targets[0]] = Pair(targets[0], path, partner)
    return pairs


def strip_factors(flat: Mapping[str, Any]) -> dict[str, Any]:
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



@register("lora")
@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """LoRA options (``config.method = dict(name='lora', ...)``).

    targets: ordered ``(regex, rank)`` rules over kernel and embedding paths, first match wins;
        rank 0 (or None) leaves a matched path alone, so an exclusion can precede a broad rule.
    alpha: the scale numerator (PEFT's ``lora_alpha``, default 8 as there);
        ``alpha_rules`` are ``(regex, alpha)`` rules over the targets (PEFT's ``alpha_pattern``).
    rslora: scale ``alpha / sqrt(r)`` instead of ``alpha / r``.
    init_weights: how the factors start (PEFT's ``init_lora_weights``; ``init`` would shadow
        the method). Random: 'kaiming_uniform' (PEFT's default, A ~ U(±1/sqrt(fan_in))) or
        'gaussian' (A ~ N(0, 1/r)), with B = 0; embedding tables follow PEFT instead: A = 0,
        B ~ N(0, 1). From the weight: 'pissa', 'olora', 'corda_ipm' or 'corda_kpm' (see
        :mod:`research.lowrank.init`) write ``W - s·A·B`` into the frozen kernel; these adapt
        kernels only (an embedding target is an error).
    calibration_batches: training batches whose layer inputs give CorDA its covariances
        (default 8 for 'corda_*', and only those read any).
    dropout: dropout on the input of the low-rank path while training ('dropout' rng).
    also_train: extra path regexes that train (a classifier head, say); ``trainable``, when
        given, replaces the default (the factors plus ``also_train``).
    input_axes: ``(regex, n)`` rules saying how many leading kernel axes are inputs (default 1).
    """

    targets: tuple = ()
    alpha: float = 8.0
    alpha_rules: tuple = ()
    rslora: bool = False
    init_weights: str = "kaiming_uniform"
    calibration_batches: int | None = None
    dropout: float = 0.0
    also_train: tuple = ()
    input_axes: tuple = DEFAULT_INPUT_AXES

    # Leaves of the adapter itself: what trains by default (DoRA adds its magnitudes).
    adapter_leaves: ClassVar[tuple] = (FACTOR_PATTERN,)

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("targets", "alpha_rules", "input_axes"):
            set_(self, name, tree.rule_tuples(getattr(self, name)))
        set_(self, "also_train", tuple(self.also_train or ()))
        if not self.targets:
            raise ValueError("LoRA needs targets: (regex, rank) rules over kernel paths")
        for pattern, rank in self.targets:
            if rank is not None and (not isinstance(rank, int) or rank < 0):
                raise ValueError(f"LoRA target rule {pattern!r}: rank {rank!r} is not a "
                                 f"non-negative integer")
        if self.init_weights not in INITS:
            raise ValueError(f"LoRA init_weights={self.init_weights!r} is not one of {INITS}")
        if self.calibration_batches is None:
            set_(self, "calibration_batches", DEFAULT_CALIBRATION_BATCHES if self.corda else 0)
        if not isinstance(self.calibration_batches, int) or self.calibration_batches < 0:
            raise ValueError(f"LoRA calibration_batches={self.calibration_batches!r} is not a "
                             f"non-negative integer")
        if self.corda and not self.calibration_batches:
            raise ValueError(f"LoRA init_weights={self.init_weights!r} needs "
                             f"calibration_batches >= 1 (its input covariances)")
        if self.calibration_batches and not self.corda:
            raise ValueError(f"LoRA calibration_batches={self.calibration_batches} is only read "
                             f"by init_weights 'corda_ipm' / 'corda_kpm', not "
                             f"{self.init_weights!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r} is not in [0, 1)")
        if self.trainable is None:
            set_(self, "trainable", (*self.adapter_leaves, *self.also_train))
        else:
            set_(self, "trainable", tuple(self.trainable))

    @property
    def corda(self) -> bool:
        return self.init_weights.startswith("corda")

    # --- which leaves, which ranks ---------------------------------------------------------

    def scale_for(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def plan(self, params) -> dict[str, Target]:
        """``{kernel or embedding path: Target}`` for ``params`` (arrays or shapes). Rules that
        match nothing, ranks too large and unknown layouts are one-line errors."""
        flat = strip_factors(tree.flatten(params))
        candidates = [p for p in flat if p.rpartition(tree.SEP)[2] in TARGET_LEAVES]
        ranks = tree.resolve_rules(self.targets, candidates, what="LoRA target rule")
        chosen = [p for p in candidates if ranks[p]]
        alphas = tree.resolve_rules(self.alpha_rules, chosen, default=self.alpha,
                                    what="LoRA alpha rule")
        inputs = tree.resolve_rules(self.input_axes, chosen, default=1, require_match=False)
        plan = {}
        for path in chosen:
            shape, rank = tuple(flat[path].shape), ranks[path]
            if path.endswith("embedding") and self.init_weights in WEIGHT_INITS:
                raise ValueError(f"LoRA init_weights={self.init_weights!r} adapts kernels; "
                                 f"{path} is an embedding table (give it rank 0)")
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

    def calibrate(self, module, params: dict, batches: dict):
        """``{target path: input covariance}`` for CorDA (None for other inits): the model runs
        plainly over each batch (a scan over the leading axis) while an interceptor adds every
        target's inputs to a running ``xᵀx``. Where a target's inputs have the batch's
        ``[batch, length]`` sample axes, padded tokens (``attention_mask`` 0) count for nothing;
        other inputs (the pooler's [CLS] vectors, say) count every row."""
        if not self.corda:
            return None
        targets = {sites.parent(t.path): t for t in self.plan(params).values()}

        def one_batch(states, batch):
            mask, seen = batch.get("attention_mask"), {}

            def add(call: sites.Call):
                target = targets[call.path]
                seen[call.path] = _add_inputs(seen.get(call.path, states[target.path]),
                                              call.inputs, target.input_axes, mask)
                return call.output()

            with sites.intercept(add, sites.at(targets)):
                module.apply({"params": params}, **batch)
            missing = [t.path for m, t in targets.items() if m not in seen]
            if missing:
                raise ValueError(f"CorDA calibration: the model never called the layer of "
                                 f"target {missing[0]}")
            return {t.path: seen[m] for m, t in targets.items()}, None

        start = {t.path: init_lib.CovarianceState(
            jnp.zeros((math.prod(t.shape[:t.input_axes]),) * 2, jnp.float32),
            jnp.zeros((), jnp.int32)) for t in targets.values()}
        states, _ = jax.lax.scan(one_batch, start, batches)
        return {path: state.covariance() for path, state in states.items()}

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with factors beside every target (factors already present are kept).
        Inits from the weight also replace each target kernel by its residual; CorDA reads
        ``stats``, :meth:`calibrate`'s covariances."""
        flat = dict(tree.flatten(params))
        for index, target in enumerate(self.plan(params).values()):
            kernel, r, n_in = flat[target.path], target.rank, target.input_axes
            module = sites.parent(target.path)
            a_path, b_path = sites.join(module, A), sites.join(module, B)
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
            if self.init_weights in WEIGHT_INITS:
                a, b, flat[target.path] = self._from_weight(target, kernel, stats)
                a, b = a.astype(dtype), b.astype(dtype)
            elif target.path.endswith("embedding"):
                a = jnp.zeros(a_shape, dtype)  # PEFT's choice for embedding tables
                b = jax.random.normal(key, b_shape, dtype)
            else:
                if self.init_weights == "kaiming_uniform":
                    # torch kaiming_uniform_(a=sqrt(5)) on lora_A [r, fan_in]: U(±1/sqrt(fan_in))
                    bound = 1.0 / math.sqrt(math.prod(a_shape[:-1]))
                    a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
                else:
                    a = jax.random.normal(key, a_shape, dtype) / r
                b = jnp.zeros(b_shape, dtype)
            flat[a_path], flat[b_path] = a, b
        return tree.unflatten(flat)

    def _from_weight(self, target: Target, kernel, stats):
        """``(A, B, W - s·A·B)`` for one kernel by PiSSA, OLoRA or CorDA."""
        r, s, n_in = target.rank, target.scale, target.input_axes
        if self.init_weights == "pissa":
            return init_lib.pissa(kernel, r, s, n_in)
        if self.init_weights == "olora":
            return init_lib.olora(kernel, r, s, n_in)
        if not stats or target.path not in stats:
            raise ValueError(f"LoRA init_weights={self.init_weights!r} needs the input "
                             f"covariance of {target.path} (LoRA.calibrate's stats); got "
                             f"{'none' if not stats else sorted(stats)[:3]}")
        mode = self.init_weights.removeprefix("corda_")
        return init_lib.corda(kernel, stats[target.path], r, s, n_in, mode)

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

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """``module.apply`` with the low-rank path added at every adapted layer. Dropout on
        that path is on in training (``deterministic=False``)."""
        with self.low_rank_paths(module, variables["params"], kwargs):
            return Applied(module.apply(variables, *args, **kwargs))

    def low_rank_paths(self, module, params, kwargs):
        """The interception adding ``s·(x·A)·B`` to every adapted layer's own output, for a
        call with ``kwargs`` (a variant computing that output differently, QLoRA's dequantised
        base, intercepts inside this one)."""
        flat_scales = tree.flatten(self.scales(params))
        by_module = {sites.parent(path): s for path, s in flat_scales.items()}
        if getattr(getattr(module, "config", None), "scan_layers", False):
            by_module = tree.with_layer_view(by_module, what="the LoRA scale")
        rate = self.dropout if training(kwargs) else 0.0
        path = functools.partial(_low_rank_path, scales=by_module, rate=rate,
                                 combine=self.combine)
        return sites.intercept(path, sites.holding(A, B))

    def export(self, params: dict) -> dict:
        """The base with ``W + s·A·B`` folded in (:func:`merge`)."""
        return merge(params, self)

    def combine(self, layer: nn.Module, y, delta, scale: float):
        """An adapted layer's output from its own output ``y`` and the low-rank term ``delta``
        (DoRA rescales here)."""
        del layer, scale
        return y + delta.astype(y.dtype)


# ---------------------------------------------------------------------------------------------
# The low-rank path at each adapted layer
# ---------------------------------------------------------------------------------------------


def _add_inputs(state: init_lib.CovarianceState, inputs, n_in: int, mask):
    """``state`` plus one batch of a layer's inputs, padded tokens weighted 0 (see
    :meth:`LoRA.calibrate`)."""
    x = jnp.asarray(inputs, jnp.float32)
    samples = x.shape[:x.ndim - n_in]
    keep = (jnp.asarray(mask, jnp.float32) if mask is not None and samples == mask.shape
            else jnp.ones(samples, jnp.float32))
    added = init_lib.accumulate_covariance(state, x * keep.reshape(samples + (1,) * n_in), n_in)
    return added._replace(count=state.count + jnp.sum(keep).astype(jnp.int32))


def _low_rank_path(call: sites.Call, scales: dict[str, float], rate: float, combine):
    a, b = call.param(A), call.param(B)
    y, scale = call.output(), scales[call.path]
    n_in, dtype = call.input_axes, call.dtype(a)
    if n_in == 0:
        rows = jnp.take(a, call.inputs, axis=0).astype(dtype)
        delta = jnp.tensordot(rows * scale, b.astype(dtype), 1)
        return combine(call.layer, y, delta, scale)
    if a.ndim - 1 != n_in:
        raise ValueError(f"LoRA factor {call.path}/{A} {a.shape} has {a.ndim - 1} input axes; "
                         f"the layer's kernel has {n_in} (set LoRA input_axes)")
    x = call.inputs.astype(dtype)
    if rate:
        x = dropout(call.layer.make_rng("dropout"), rate, x)
    delta = low_rank(x, a.astype(dtype), b.astype(dtype), n_in, float(scale))
    return combine(call.layer, y, delta, scale)


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


def scale_map(scales, params, pairs) -> dict[str, float]:
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
    s = scale_map(scales, params, pairs)
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
    s = scale_map(scales, tree.unflatten(combined), pairs)
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
    s = scale_map(scales, params, pairs)
    adapter = {p: flat[p] for pair in pairs.values() for p in (pair.a, pair.b)}
    return tree.unflatten(adapter), tree.unflatten({path: s[path] for path in pairs})


def to_plain_lora(method: LoRA, params, initial_factors) -> tuple[LoRA, dict]:
    """A PiSSA / OLoRA / CorDA adapter as a plain LoRA over the *original* base, PEFT's
    ``path_initial_model_for_weight_conversion``: such an init moves ``s·A₀·B₀`` out of each
    kernel, so the trained adapter only makes sense on the residual base. With
    ``W = W_res + s·A₀·B₀``, the trained layer ``W_res + s·A·B`` is ``W + s·[A, A₀]·[B; -B₀]``:
    a rank-2r adapter at the same scale (alpha doubled, or times sqrt 2 under rsLoRA).
    ``initial_factors``: :func:`lora_factors` of the params right after ``init``. Returns the
    plain method and ``params`` with the original kernels and the rank-2r factors."""
    flat, initial = dict(tree.flatten(params)), tree.flatten(initial_factors)
    scales = tree.flatten(method.scales(params))
    for path, pair in factor_pairs(flat).items():
        if pair.a not in initial or pair.b not in initial:
            raise ValueError(f"to_plain_lora: initial_factors has no {pair.a!r} / {pair.b!r}")
        a0, b0 = initial[pair.a], initial[pair.b]
        if a0.shape != flat[pair.a].shape or b0.shape != flat[pair.b].shape:
            raise ValueError(f"to_plain_lora: initial factors at {pair.module} are "
                             f"{a0.shape} / {b0.shape}; the trained ones "
                             f"{flat[pair.a].shape} / {flat[pair.b].shape}")
        kernel = flat[path]
        flat[path] = (kernel + _delta(pair, initial, scales[path])).astype(kernel.dtype)
        flat[pair.a] = jnp.concatenate([flat[pair.a], a0], axis=-1)
        flat[pair.b] = jnp.concatenate([flat[pair.b], -b0], axis=0)
    factor = math.sqrt(2.0) if method.rslora else 2.0
    plain = dataclasses.replace(
        method, init_weights=RANDOM_INITS[0], calibration_batches=0,
        targets=tuple((pattern, 2 * rank if rank else rank) for pattern, rank in method.targets),
        alpha=method.alpha * factor,
        alpha_rules=tuple((pattern, alpha * factor) for pattern, alpha in method.alpha_rules))
    return plain, tree.unflatten(flat)
