"""Side networks: the model stays frozen, its blocks' outputs are read at *taps* (intercepted
through :mod:`research.sites`, behind ``jax.lax.stop_gradient``) and something small trains
beside it. No gradient enters the backbone, so training keeps none of its activations.

- Hierarchical side-tuning, ``side_tuning`` (Lin et al., 2023, "Hierarchical Side-Tuning for
  Vision Transformers"): a narrow side network, one block of width ``width`` per tap, whose
  stage ``i`` adds a projection of tap ``i`` to its state; its output, projected back to the
  model's width, replaces the last tap's output, so the model's own head reads it. A plain ViT
  has one scale, so the side network here has one too (the paper's pyramid serves detection).
- Visual query tuning, ``vqt`` (Tu, Mai & Chao, 2023, "Visual Query Tuning: Towards Effective
  Usage of Intermediate Representations for Parameter and Memory Efficient Transfer Learning"):
  ``num_queries`` learned tokens per tap run through that block, with its own weights, in front
  of the block's (frozen) input; they attend over the real tokens, which never see them, so
  every real output is the plain model's. Their outputs, the layer's *summaries*, feed a linear
  head; with the model's own head on the final [CLS] it is the paper's linear head on their
  concatenation, the summaries' part (``vqt/head``) starting at zero.
- LEVI, ``levi`` (Roh et al., 2024, "LEVI: Generalizable Fine-tuning via Layer-wise Ensemble of
  Different Views"): a small model trained from scratch (one narrow block per tap) reads the
  model's input (the embedded tokens or patches at ``source``), independent of the pretrained
  features; layer by layer its output, through an adapting projection, joins the pretrained
  tap's, and learned layer weights mix the joined features into what the model's head reads.
  The projections start at zero and the weights on the last layer alone, so the ensemble starts
  as the pretrained model. The paper averages per-layer predictions; one mix before the head
  keeps the model's own head and output format.

Each method's leaves sit under its name (``side_tuning/...``, ``vqt/...``, ``levi/...``); the
narrow blocks are the zoo's :class:`~research.models.layers.Block`. Gradients reach only those
leaves and ``also_train`` (the head, after the features): every other leaf enters behind
``stop_gradient``, and the model goes on from each tap with its output as a constant, so the
backbone takes no gradient even when marked trainable. Nothing folds into the weights:
``export`` keeps the side leaves beside the model's.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import sites, tree
from research.methods import Applied, Method, register
from research.models.attention import Mask
from research.models.layers import Block, ModelConfig, make_config

BLOCKS = (r"encoder/layer_\d+",)  # every block of the zoo's stacks
HEAD = (r"classifier/.*",)
INIT_STD = 0.02  # the zoo's initializer_range


# ---------------------------------------------------------------------------------------------
# Taps
# ---------------------------------------------------------------------------------------------


def natural_key(path: str) -> list:
    """Sort key putting ``layer_2`` before ``layer_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def module_paths(flat: dict) -> list[str]:
    """Every module path (each proper prefix of a leaf path), in natural order."""
    modules = {tree.SEP.join(path.split(tree.SEP)[:end])
               for path in flat for end in range(1, path.count(tree.SEP) + 1)}
    return sorted(modules, key=natural_key)


def choose_taps(patterns: tuple, modules: list[str], key: str = "config.method.taps"):
    """The modules some pattern fully matches, in natural (call) order; a pattern matching no
    module is a one-line error naming ``key``."""
    chosen = set()
    for pattern in patterns:
        hits = {path for path in modules if re.fullmatch(pattern, path)}
        if not hits:
            near = ", ".join(tree.closest_paths(pattern, modules))
            raise ValueError(f"{key} pattern {pattern!r} matches no module; closest: {near}")
        chosen |= hits
    return tuple(sorted(chosen, key=natural_key))


def tap_width(flat: dict, tap: str, key: str = "config.method.taps") -> int:
    """The width of a block's output: the size of its norms' scales."""
    scales = [leaf for path, leaf in flat.items()
              if path.startswith(tap + tree.SEP) and sites.leaf(path) == "scale"]
    if not scales:
        raise ValueError(f"{key}: {tap!r} holds no norm scale, so it is no block whose width "
                         f"can be read; tap the stack's layers, e.g. {BLOCKS[0]!r}")
    return int(scales[0].shape[-1])


# ---------------------------------------------------------------------------------------------
# Small pieces of the side networks
# ---------------------------------------------------------------------------------------------


def check_count(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.method.{key}={value!r} is not an integer >= 1")


def check_narrow(width, heads) -> None:
    check_count("width", width)
    check_count("heads", heads)
    if width % heads:
        raise ValueError(f"config.method.heads={heads} does not divide config.method.width="
                         f"{width}")


def narrow_config(width: int, heads: int, model: ModelConfig | None = None) -> ModelConfig:
    """A pre-LN GELU block of ``width`` (its MLP 4x wider), no dropout, computing as the model
    does."""
    engine = {} if model is None else dict(dtype=model.dtype,
                                           attention_impl=model.attention_impl)
    return make_config(hidden_size=width, num_heads=heads, mlp_dim=4 * width, num_layers=1,
                       norm="layernorm", pre_norm=True, mlp="gelu", use_bias=True,
                       norm_eps=1e-6, initializer_range=INIT_STD, **engine)


def block_shapes(config: ModelConfig, count: int) -> dict:
    """``{layer_i: shapes}`` of ``count`` narrow blocks."""
    dummy = jax.ShapeDtypeStruct((1, 1, config.hidden_size), jnp.float32)
    boxed = jax.eval_shape(lambda x: Block(config).init(jax.random.key(0), x, Mask(), True), dummy)
    return {f"layer_{i}": nn.unbox(boxed["params"]) for i in range(count)}


def dense_shapes(fan_in: int, fan_out: int) -> dict:
    return {"kernel": jax.ShapeDtypeStruct((fan_in, fan_out), jnp.float32),
            "bias": jax.ShapeDtypeStruct((fan_out,), jnp.float32)}


def zoo_init(rng, shapes: dict) -> dict:
    """Leaves of ``shapes`` as the zoo starts them (kernels N(0, 0.02), norm scales one,
    biases zero) from one draw, so XLA compiles one generator rather than one per kernel."""
    flat = tree.flatten(shapes)
    drawn = [path for path in flat if sites.leaf(path) == "kernel"]
    sizes = [flat[path].size for path in drawn]
    draw = INIT_STD * jax.random.normal(rng, (sum(sizes),), jnp.float32)
    pieces = jnp.split(draw, list(itertools.accumulate(sizes))[:-1]) if drawn else []
    leaves = {path: piece.reshape(flat[path].shape) for path, piece in zip(drawn, pieces)}
    for path, shape in flat.items():
        if path not in leaves:
            fill = jnp.ones if sites.leaf(path) == "scale" else jnp.zeros
            leaves[path] = fill(shape.shape, jnp.float32)
    return tree.unflatten({path: leaves[path] for path in flat})


def run_block(config: ModelConfig, params: dict, x, mask: Mask, rows: int | None = None):
    """One narrow block over ``x`` [B, L, width]; ``rows``: only the first rows come out."""
    if mask.padding is not None:  # a side state cut to fewer rows attends to those alone
        mask = Mask(mask.padding[:, :x.shape[1]], mask.causal)
    return Block(config).apply({"params": params}, x, mask, True,
                               rows if rows is not None and rows < x.shape[1] else None)


def dense(params: dict, x):
    return x @ params["kernel"].astype(x.dtype) + params["bias"].astype(x.dtype)


def layer_norm(params: dict, x, eps: float = 1e-6):
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    normed = centred * jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)
    return (normed * params["scale"] + params["bias"]).astype(x.dtype)


def block_args(call: sites.Call, key: str = "config.method.taps"):
    """``(x, mask)`` of a block call: ``Block(x, mask, deterministic, rows)``."""
    if len(call.args) < 2 or not isinstance(call.args[1], Mask):
        raise ValueError(f"{key}: {call.path!r} is not a block (called with (x, mask, ...)); "
                         f"tap the stack's layers, e.g. {BLOCKS[0]!r}")
    return call.args[0], call.args[1]


# ---------------------------------------------------------------------------------------------
# The shared method
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SideMethod(Method):
    """What the three share: taps, the method's leaves under :attr:`prefix`, the head that
    trains with them, the backbone behind ``stop_gradient``, and an export that keeps the side
    leaves. A subclass gives :meth:`own_init` and :meth:`runner`.

    taps: regexes over module paths (fully matched), the blocks whose outputs are read;
        default every block of the stack.
    also_train: path regexes that train with the method (the head the features reach).
    """

    taps: tuple = BLOCKS
    also_train: tuple = HEAD

    prefix: ClassVar[str] = ""
    scannable: ClassVar[bool] = False  # one tap per layer path

    def __post_init__(self):
        set_ = object.__setattr__
        for key in ("taps", "also_train"):
            value = getattr(self, key)
            value = (value,) if isinstance(value, str) else tuple(value or ())
            if not all(isinstance(pattern, str) for pattern in value):
                raise ValueError(f"config.method.{key}={value!r} is not a list of regexes")
            set_(self, key, value)
        if not self.taps:
            raise ValueError("config.method.taps is empty; give regexes over block paths, e.g. "
                             f"{BLOCKS[0]!r}")
        if self.trainable is None:
            set_(self, "trainable", (re.escape(self.prefix) + "/.*", *self.also_train))

    def owns(self, path: str) -> bool:
        return path.startswith(self.prefix + tree.SEP)

    def plan(self, params) -> tuple[str, ...]:
        """The tapped module paths of ``params`` (arrays or shapes), in call order."""
        flat = {p: v for p, v in tree.flatten(params).items() if not self.owns(p)}
        return choose_taps(self.taps, module_paths(flat))

    def own_init(self, rng, flat: dict, taps: tuple) -> dict:
        """The method's leaves (a nested dict), from the model's ``flat`` params."""
        raise NotImplementedError

    def runner(self, own: dict, taps: tuple, config: ModelConfig | None, state: dict):
        """``(handle, sites, finish)``: ``handle(call)`` runs at each module of ``sites``
        (taps and any other site the method reads) and returns its output, keeping what it
        needs in ``state``; ``finish`` turns the model's outputs into the method's."""
        raise NotImplementedError

    # --- the Method interface --------------------------------------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        del stats
        flat = dict(tree.flatten(params))
        own = tree.flatten(self.own_init(rng, flat, self.plan(params)))
        flat.update({sites.join(self.prefix, path): leaf for path, leaf in own.items()})
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """The side leaves are small: replicated."""
        flat = dict(tree.flatten(logical))
        for path, shape in tree.flatten(shapes).items():
            if self.owns(path):
                flat[path] = (None,) * len(shape.shape)
        return tree.unflatten(flat)

    def run(self, module, variables, *args, **kwargs) -> tuple:
        """``(method outputs, state)``: the model run with the method, and what its runner
        kept while it ran (VQT's summaries)."""
        flat = tree.flatten(variables["params"])
        own = {p[len(self.prefix) + 1:]: v for p, v in flat.items() if self.owns(p)}
        if not own:
            raise ValueError(f"{self.prefix}: the params hold no {self.prefix}/ leaves (run init "
                             f"first)")
        live = tree.resolve_rules([(p, True) for p in self.also_train], list(flat),
                                  default=False, require_match=False)
        model = {p: v if live[p] else jax.lax.stop_gradient(v)
                 for p, v in flat.items() if not self.owns(p)}
        taps = choose_taps(self.taps, module_paths(model))
        state: dict = {}
        handle, watched, finish = self.runner(tree.unflatten(own), taps,
                                              getattr(module, "config", None), state)
        seen: set = set()
        with sites.intercept(handle, sites.at(set(watched)), seen=seen):
            outputs = module.apply({**variables, "params": tree.unflatten(model)}, *args,
                                   **kwargs)
        sites.check_reached(watched, seen, what=f"{self.prefix} taps",
                            called=module_paths(model))
        return finish(outputs), state

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        return Applied(self.run(module, variables, *args, **kwargs)[0])

    def export(self, params: dict) -> dict:
        """The params as they are: a side network cannot fold into the model's weights."""
        return params


def _tap(call: sites.Call):
    """The block's own output as a constant: the feature the method reads, and what the model
    goes on with, so no gradient flows back into the backbone from anywhere after a tap."""
    return jax.lax.stop_gradient(call.output())


# ---------------------------------------------------------------------------------------------
# Hierarchical side-tuning
# ---------------------------------------------------------------------------------------------


@register("side_tuning")
@dataclasses.dataclass(frozen=True)
class SideTuning(SideMethod):
    """Hierarchical side-tuning options (``config.method = dict(name='side_tuning', ...)``).

    width: the side network's width; heads: its attention heads (dividing ``width``).
    Leaves: ``down_i`` (tap ``i`` -> width), ``layer_i`` (a narrow block), ``norm`` and ``up``
    (width -> the model's). Stage ``i``: ``s = layer_i(s + down_i(tap_i))`` (``s`` starts at
    zero); the output ``up(norm(s))`` replaces the last tap's. A tap with fewer rows (a
    classifier's last block computes [CLS] alone) feeds those rows, and its stage computes only
    them, as the model's own block does.
    """

    width: int = 64
    heads: int = 4

    prefix: ClassVar[str] = "side_tuning"

    def __post_init__(self):
        super().__post_init__()
        check_narrow(self.width, self.heads)

    def own_init(self, rng, flat: dict, taps: tuple) -> dict:
        widths = [tap_width(flat, tap) for tap in taps]
        shapes = block_shapes(narrow_config(self.width, self.heads), len(taps))
        for i, width in enumerate(widths):
            shapes[f"down_{i}"] = dense_shapes(width, self.width)
        norm = jax.ShapeDtypeStruct((self.width,), jnp.float32)
        shapes["norm"] = {"scale": norm, "bias": norm}
        shapes["up"] = dense_shapes(self.width, widths[-1])
        return zoo_init(rng, shapes)

    def runner(self, own: dict, taps: tuple, config, state: dict):
        side = narrow_config(self.width, self.heads, config)
        index = {tap: i for i, tap in enumerate(taps)}

        def handle(call: sites.Call):
            out = _tap(call)
            _, mask = block_args(call)
            i = index[call.path]
            fed = dense(own[f"down_{i}"], out)
            s = state["side"] if "side" in state else jnp.zeros_like(fed)
            rows = min(fed.shape[1], s.shape[1])
            s = s.at[:, :rows].add(fed[:, :rows])
            state["side"] = s = run_block(side, own[f"layer_{i}"], s, mask, rows)
            if i < len(taps) - 1:
                return out
            return dense(own["up"], layer_norm(own["norm"], s)).astype(out.dtype)

        return handle, taps, lambda outputs: outputs


# ---------------------------------------------------------------------------------------------
# Visual query tuning
# ---------------------------------------------------------------------------------------------


@register("vqt")
@dataclasses.dataclass(frozen=True)
class VisualQueryTuning(SideMethod):
    """Visual query tuning options (``config.method = dict(name='vqt', ...)``).

    num_queries: learned query tokens per tap (the paper's T).
    head: the module of the model's classifier (its kernel's last axis gives the classes).
    Leaves: ``queries`` [taps, num_queries, width] and ``head/kernel`` [taps·num_queries·width,
    classes], zero. The logits are the model's plus the flattened summaries times
    ``head/kernel``. The queries sit in front of each tapped block's input with their own
    keys masked out: a bidirectional model without rotary positions (BERT, ViT). Their pass
    through the block has no dropout.
    """

    num_queries: int = 1
    head: str = "classifier"

    prefix: ClassVar[str] = "vqt"

    def __post_init__(self):
        super().__post_init__()
        check_count("num_queries", self.num_queries)

    def own_init(self, rng, flat: dict, taps: tuple) -> dict:
        kernel = sites.join(self.head, "kernel")
        if kernel not in flat:
            raise ValueError(f"config.method.head={self.head!r} holds no kernel; closest: "
                             f"{', '.join(tree.closest_paths(kernel, flat))}")
        width, classes = tap_width(flat, taps[0]), int(flat[kernel].shape[-1])
        queries = INIT_STD * jax.random.normal(rng, (len(taps), self.num_queries, width))
        head = jnp.zeros((len(taps) * self.num_queries * width, classes), jnp.float32)
        return {"queries": queries, "head": {"kernel": head}}

    def runner(self, own: dict, taps: tuple, config, state: dict):
        if config is not None and (config.causal or config.rotary):
            raise ValueError(f"vqt: queries in front of the tokens need a bidirectional model "
                             f"without rotary positions (BERT, ViT); this one has causal="
                             f"{config.causal}, rotary={config.rotary}")
        index = {tap: i for i, tap in enumerate(taps)}
        summaries = state.setdefault("summaries", {})

        def handle(call: sites.Call):
            out = _tap(call)
            summaries[call.path] = summarise(call, own["queries"][index[call.path]])
            return out

        def finish(logits):
            kernel = own["head"]["kernel"]
            flat = jnp.concatenate([summaries[tap].reshape(logits.shape[0], -1)
                                    for tap in taps], axis=-1)
            if logits.ndim != 2 or flat.shape[-1] != kernel.shape[0]:
                raise ValueError(f"vqt: the model's outputs {tuple(logits.shape)} are no "
                                 f"classifier logits [batch, classes] for vqt/head/kernel "
                                 f"{tuple(kernel.shape)}")
            return logits + (flat.astype(jnp.float32) @ kernel).astype(logits.dtype)

        return handle, taps, finish

    def summaries(self, module, variables, *args, **kwargs) -> dict:
        """``{tap: [batch, num_queries, width]}``: each tapped block's outputs for its queries."""
        return self.run(module, variables, *args, **kwargs)[1]["summaries"]


def summarise(call: sites.Call, queries):
    """The block, with its own (frozen) weights, on ``queries`` [n, width] in front of its input:
    only their rows are computed, and their keys are masked out, so they read the real tokens
    and nothing else."""
    x, mask = block_args(call)
    x = jax.lax.stop_gradient(x)
    batch, length, n = x.shape[0], x.shape[1], queries.shape[0]
    front = jnp.broadcast_to(queries.astype(x.dtype), (batch, n, x.shape[-1]))
    padding = (jnp.ones((batch, length), bool) if mask.padding is None
               else mask.padding.astype(bool))
    padding = jnp.concatenate([jnp.zeros((batch, n), bool), padding], axis=1)
    weights = jax.lax.stop_gradient(call.layer.variables["params"])
    return call.layer.clone(parent=None).apply(
        {"params": weights}, jnp.concatenate([front, x], axis=1), Mask(padding, mask.causal),
        True, n)


# ---------------------------------------------------------------------------------------------
# LEVI
# ---------------------------------------------------------------------------------------------


@register("levi")
@dataclasses.dataclass(frozen=True)
class Levi(SideMethod):
    """LEVI options (``config.method = dict(name='levi', ...)``).

    width, heads: the small model's width and attention heads (dividing ``width``).
    source: the module whose *input* the small model reads (the first block's: the embedded
        input, the same for text and images).
    Leaves: ``embed`` (model width -> width), ``layer_i`` (one narrow block per tap),
    ``adapt_i`` (width -> model width, zero) and ``mix`` [taps] (one-hot on the last). With
    ``z_i`` the small model after its block ``i`` and ``h_i`` tap ``i``, the last tap's output
    becomes ``sum_i mix_i (h_i + adapt_i(z_i))`` on the rows that tap computes.
    """

    width: int = 64
    heads: int = 4
    source: str = "encoder/layer_0"

    prefix: ClassVar[str] = "levi"

    def __post_init__(self):
        super().__post_init__()
        check_narrow(self.width, self.heads)

    def own_init(self, rng, flat: dict, taps: tuple) -> dict:
        modules = module_paths(flat)
        if self.source not in modules:
            raise ValueError(f"config.method.source={self.source!r} is not a module; closest: "
                             f"{', '.join(tree.closest_paths(self.source, modules))}")
        shapes = block_shapes(narrow_config(self.width, self.heads), len(taps))
        shapes["embed"] = dense_shapes(tap_width(flat, self.source, "config.method.source"),
                                       self.width)
        own = zoo_init(rng, shapes)
        for i, tap in enumerate(taps):
            width = tap_width(flat, tap)
            own[f"adapt_{i}"] = {"kernel": jnp.zeros((self.width, width), jnp.float32),
                                 "bias": jnp.zeros((width,), jnp.float32)}
        own["mix"] = jnp.zeros((len(taps),), jnp.float32).at[-1].set(1.0)
        return own

    def runner(self, own: dict, taps: tuple, config, state: dict):
        small = narrow_config(self.width, self.heads, config)
        index = {tap: i for i, tap in enumerate(taps)}

        def handle(call: sites.Call):
            if call.path == self.source:
                x, mask = block_args(call, "config.method.source")
                state["input"], state["mask"] = jax.lax.stop_gradient(x), mask
            if call.path not in index:
                return call.output()
            out = state[call.path] = _tap(call)
            if index[call.path] < len(taps) - 1:
                return out
            if "input" not in state:
                raise ValueError(f"levi source={self.source!r} runs after the last tap "
                                 f"{call.path!r}; the small model must read the input first")
            return ensemble(own, small, [state[tap] for tap in taps], state["input"],
                            state["mask"], rows=out.shape[1]).astype(out.dtype)

        return handle, (*taps, self.source), lambda outputs: outputs


def ensemble(own: dict, small: ModelConfig, features: list, inputs, mask: Mask, rows: int):
    """``sum_i mix_i (h_i + adapt_i(z_i))`` over the first ``rows`` rows: the small model's
    layers ``z_i`` read the input alone, the pretrained features ``h_i`` join layer by layer."""
    z = dense(own["embed"], inputs)
    total = 0.0
    for i, feature in enumerate(features):
        last = i == len(features) - 1
        z = run_block(small, own[f"layer_{i}"], z, mask, rows if last else None)
        joined = feature[:, :rows] + dense(own[f"adapt_{i}"], z[:, :rows])
        total = total + own["mix"][i].astype(joined.dtype) * joined
    return total
