"""Which axes of which leaves share a basis: the transport-map flow of a zoo transformer.

Transformer fusion (Imfeld et al., 2024, "Transformer Fusion with Optimal Transport") aligns
model B to model A one basis at a time, in the order the signal flows: the embeddings fix the
residual stream's map; in every block the attention's queries/keys and values/outputs get maps
per head, its output gets a map that a residual policy combines with the incoming one; the MLP's
hidden units get a map; norms are carried by the residual map they act on; the head reads the
last residual map. git-re-basin (Ainsworth et al., 2023) calls the same description a
permutation spec; here the maps may be soft.

A :class:`Spec` is that description, built once per architecture by :func:`spec_for` from the
model config alone, so alignment, fusion and the permutation baselines are generic over it:

* ``steps``, in flow order: :class:`Units` (a map solved over one axis of units),
  :class:`Heads` (an attention layer's head plan shared by Q, K, V and O, with a within-head
  map for query/key dimensions and one for value dimensions) and :class:`Residual` (the stream
  after a sublayer: its policy combines the incoming map with the sublayer output's map);
* ``axes``: for every leaf, the map acting on each axis (None: an axis no map touches). A heads
  map names two consecutive axes, ``(heads, head_dim)``; a leaf with more heads than the map's
  key/value heads (grouped-query attention) holds its query heads in kv-head-major groups.

A step's weight cost reads its ``producers``: the leaves (and unit axis) whose slices are its
units' incoming weights. Its activation cost reads its ``site``: a function of the captured
module outputs (``capture_intermediates``) giving the units' activations ``[..., units]``
(heads sites give a list of ``[..., heads, head_dim]`` arrays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn

from research.models.layers import ModelConfig

Producers = tuple[tuple[str, int], ...]  # (leaf path, axis of the units)
Site = Callable[[dict], object]


@dataclasses.dataclass(frozen=True)
class Units:
    name: str
    producers: Producers
    site: Site


@dataclasses.dataclass(frozen=True)
class Heads:
    qk: str
    vo: str
    qk_producers: Producers  # the axis is the heads axis; head_dim follows it
    vo_producers: Producers
    qk_site: Site
    vo_site: Site
    # Rotary positions give each query/key dimension pair its own frequency, so only whole
    # heads may move: the query/key map within a head stays the identity.
    within_qk: bool


@dataclasses.dataclass(frozen=True)
class Residual:
    name: str      # the stream after the sublayer
    block: str     # "layer_3/attn": what residual-policy rules match
    incoming: str  # the stream's map before the sublayer
    out: Units     # the sublayer output's map


@dataclasses.dataclass(frozen=True)
class Spec:
    family: str
    steps: tuple[Units | Heads | Residual, ...]
    axes: dict[str, tuple[str | None, ...]]


def output(captured: dict, path: str):
    """The output a module (``path``, '/'-separated) returned under ``capture_intermediates``."""
    node = captured
    for part in path.split("/"):
        node = node[part]
    return node["__call__"][0]


def _stack(config: ModelConfig, prefix: str, incoming: str, steps: list, axes: dict) -> str:
    """Add the blocks of ``Stack`` at ``prefix``; return the last residual map's name."""
    c = config
    residual = incoming
    for index in range(c.num_layers):
        layer = f"{prefix}/layer_{index}"
        name = f"layer_{index}"
        if f"{name}/attn" not in c.removed_sublayers:
            attn, qk, vo, out = f"{layer}/attn", f"{name}/attn/qk", f"{name}/attn/vo", \
                f"{name}/attn/out"
            after = f"{name}/attn/residual"
            axes[f"{layer}/attn_norm/scale"] = (residual if c.pre_norm else after,)
            for projection, head_map in (("query", qk), ("key", qk), ("value", vo)):
                axes[f"{attn}/{projection}/kernel"] = (residual, head_map, head_map)
                axes[f"{attn}/{projection}/bias"] = (head_map, head_map)
            axes[f"{attn}/out/kernel"] = (vo, vo, out)
            axes[f"{attn}/out/bias"] = (out,)
            steps.append(Heads(
                qk=qk, vo=vo,
                qk_producers=tuple((f"{attn}/{p}/{leaf}", 1 if leaf == "kernel" else 0)
                                   for p in ("query", "key") for leaf in ("kernel", "bias")),
                vo_producers=((f"{attn}/value/kernel", 1), (f"{attn}/value/bias", 0)),
                qk_site=lambda cap, a=attn: [output(cap, f"{a}/query"), output(cap, f"{a}/key")],
                vo_site=lambda cap, a=attn: [output(cap, f"{a}/value")],
                within_qk=not c.rotary))
            steps.append(Residual(after, f"{name}/attn", residual, Units(
                out, ((f"{attn}/out/kernel", 2), (f"{attn}/out/bias", 0)),
                lambda cap, a=attn: output(cap, f"{a}/out"))))
            residual = after
        if f"{name}/mlp" not in c.removed_sublayers:
            mlp, hidden, out = f"{layer}/mlp", f"{name}/mlp/hidden", f"{name}/mlp/out"
            after = f"{name}/mlp/residual"
            axes[f"{layer}/mlp_norm/scale"] = (residual if c.pre_norm else after,)
            inner, outer = (("gate", "up"), "down") if c.mlp == "swiglu" else (("wi",), "wo")
            for leaf in inner:
                axes[f"{mlp}/{leaf}/kernel"] = (residual, hidden)
                axes[f"{mlp}/{leaf}/bias"] = (hidden,)
            axes[f"{mlp}/{outer}/kernel"] = (hidden, out)
            axes[f"{mlp}/{outer}/bias"] = (out,)
            if c.mlp == "swiglu":
                def hidden_site(cap, m=mlp):
                    return nn.silu(output(cap, f"{m}/gate")) * output(cap, f"{m}/up")
            else:
                def hidden_site(cap, m=mlp):
                    return nn.gelu(output(cap, f"{m}/wi"), approximate=False)
            steps.append(Units(hidden, tuple((f"{mlp}/{leaf}/{kind}", 1 if kind == "kernel" else 0)
                                             for leaf in inner for kind in ("kernel", "bias")),
                               hidden_site))
            steps.append(Residual(after, f"{name}/mlp", residual, Units(
                out, ((f"{mlp}/{outer}/kernel", 1), (f"{mlp}/{outer}/bias", 0)),
                lambda cap, m=mlp, o=outer: output(cap, f"{m}/{o}"))))
            residual = after
    return residual


def _norm_bias(axes: dict) -> dict:
    # A LayerNorm's bias lives on its scale's axis; RMSNorm has none (dropped when unused).
    return {**axes, **{path[:-len("scale")] + "bias": axis for path, axis in axes.items()
                       if path.endswith("/scale")}}


def _vit(c: ModelConfig, head: str):
    steps = [Units("embed", (("embeddings/patch/kernel", 3), ("embeddings/patch/bias", 0),
                             ("embeddings/cls", 0), ("embeddings/position", 1)),
                   lambda cap: output(cap, "embeddings"))]
    axes = {"embeddings/patch/kernel": (None, None, None, "embed"),
            "embeddings/patch/bias": ("embed",), "embeddings/cls": ("embed",),
            "embeddings/position": (None, "embed")}
    last = _stack(c, "encoder", "embed", steps, axes)
    axes["encoder/final_norm/scale"] = (last,)
    axes["classifier/kernel"], axes["classifier/bias"] = (last, None), (None,)
    return steps, axes


def _bert(c: ModelConfig, head: str):
    tables = ("word", "position", "token_type")
    steps = [Units("embed", tuple((f"embeddings/{t}/embedding", 1) for t in tables),
                   lambda cap: output(cap, "embeddings"))]
    axes = {f"embeddings/{t}/embedding": (None, "embed") for t in tables}
    axes["embeddings/norm/scale"] = ("embed",)
    last = _stack(c, "encoder", "embed", steps, axes)
    if head in ("encoder", "classifier"):
        steps.append(Units("pooler", (("pooler/kernel", 1), ("pooler/bias", 0)),
                           lambda cap: output(cap, "pooler")))
        axes["pooler/kernel"], axes["pooler/bias"] = (last, "pooler"), ("pooler",)
    if head == "classifier":
        axes["classifier/kernel"], axes["classifier/bias"] = ("pooler", None), (None,)
    if head == "mlm":
        # The decoder is the word embedding, so the transform must land in its basis.
        axes["mlm/transform/kernel"], axes["mlm/transform/bias"] = (last, "embed"), ("embed",)
        axes["mlm/transform_norm/scale"], axes["mlm/bias"] = ("embed",), (None,)
    return steps, axes


def _llama(c: ModelConfig, head: str):
    steps = [Units("embed", (("embeddings/word/embedding", 1),),
                   lambda cap: output(cap, "embeddings"))]
    axes = {"embeddings/word/embedding": (None, "embed")}
    last = _stack(c, "decoder", "embed", steps, axes)
    axes["decoder/final_norm/scale"] = (last,)
    axes["lm_head/kernel"] = (last, None)
    return steps, axes


_BUILDERS = {"vit": _vit, "bert": _bert, "llama": _llama}


def spec_for(model) -> Spec:
    """The transport-map flow of a zoo :class:`~research.models.Model`."""
    steps, axes = _BUILDERS[model.family](model.config, model.head)
    return Spec(model.family, tuple(steps), _norm_bias(axes))
