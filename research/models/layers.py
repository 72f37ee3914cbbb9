"""One configurable transformer block for every model in the zoo.

The block is the Transformer layer of Vaswani et al. (2017, "Attention Is All You Need") with
the switches that separate its descendants: post-LN (BERT, Devlin et al. 2019) or pre-LN
(ViT, Dosovitskiy et al. 2021; Llama, Touvron et al. 2023); LayerNorm (Ba et al. 2016) or
RMSNorm (Zhang & Sennrich 2019); a GELU MLP or SwiGLU (Shazeer 2020); rotary positions (RoPE,
Su et al. 2021); causal masking; grouped-query attention (GQA, Ainslie et al. 2023).

Every weight carries logical axis names and key activations carry logical constraints, so
sharding is chosen by rules outside model code (MaxText's scheme).
"""

from __future__ import annotations

import contextvars
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import tree
from research.models.dropout import Dropout
from research.models.attention import IMPLS as ATTENTION_IMPLS, attend, make_mask

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
SUBLAYERS = ("attn", "mlp")
# What a rematerialised block keeps for the backward pass (``model.remat``), as a
# jax.checkpoint policy: "full" keeps only the block's input, "dots" every matmul output,
# "dots_no_batch" the matmul outputs without batch dimensions; "none" does not remat.
REMAT = {"full": None, "dots": jax.checkpoint_policies.dots_saveable,
         "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
REMAT_POLICIES = ("none", *REMAT)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of a zoo model. Params are always float32; ``dtype`` is for compute."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None  # None: one key/value head per query head
    head_dim: int | None = None      # None: hidden_size // num_heads
    mlp_dim: int = 3072
    max_length: int = 512
    type_vocab_size: int = 2
    num_classes: int = 2
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    mask_token_id: int = 103  # BERT's [MASK]; read by the masked-LM task
    norm: str = "layernorm"
    pre_norm: bool = False
    mlp: str = "gelu"
    use_bias: bool = True
    rotary: bool = False
    causal: bool = False
    tie_word_embeddings: bool = False
    norm_eps: float = 1e-12
    rope_theta: float = 10000.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    dtype: str = "float32"
    # Sublayers a pruning removed ("layer_3/attn", "layer_5/mlp"): each is skipped with its
    # norm, so the residual stream passes through unchanged, and has no params.
    removed_sublayers: tuple[str, ...] = ()
    # The engine: scan one block over the layers (compile time independent of depth) and
    # what each block keeps for the backward pass; see Stack.
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "einsum"

    def __post_init__(self):
        # Derived sizes are resolved here so every consumer (and config.json) sees numbers.
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {NORMS}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp={self.mlp!r} is not one of {MLPS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not one of "
                             f"{ATTENTION_IMPLS}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} is not one of float32, bfloat16, float16")
        # A list when read back from JSON; a tuple keeps the config hashable.
        object.__setattr__(self, "removed_sublayers", tuple(self.removed_sublayers))
        if self.scan_layers and self.removed_sublayers:
            raise ValueError(f"scan_layers=True needs every layer alike; removed_sublayers="
                             f"{self.removed_sublayers!r} makes them differ (set "
                             f"scan_layers=False)")
        for name in self.removed_sublayers:
            match = re.fullmatch(rf"layer_(\d+)/({'|'.join(SUBLAYERS)})", str(name))
            if match is None or int(match[1]) >= self.num_layers:
                raise ValueError(f"removed_sublayers: {name!r} is not layer_{{i}}/attn or "
                                 f"layer_{{i}}/mlp with 0 <= i < num_layers={self.num_layers}")
        if len(set(self.removed_sublayers)) != len(self.removed_sublayers):
            raise ValueError(f"removed_sublayers={self.removed_sublayers!r} names a sublayer twice")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(ModelConfig))


def make_config(**settings) -> ModelConfig:
    """A ModelConfig; an unknown key is a one-line ValueError listing the valid ones."""
    unknown = [key for key in settings if key not in CONFIG_FIELDS]
    if unknown:
        raise ValueError(f"unknown model config key {unknown[0]!r}; valid: "
                         f"{', '.join(CONFIG_FIELDS)}")
    return ModelConfig(**settings)


# ---------------------------------------------------------------------------------------------
# Parameters and activations with logical axis names
# ---------------------------------------------------------------------------------------------


def partitioned(init, *names):
    return nn.with_logical_partitioning(init, names)


def constrain(x, *names):
    return nn.with_logical_constraint(x, names)


def weight_init(config: ModelConfig, *names):
    # HF's initialisation: N(0, initializer_range) weights, zero biases, unit norm scales.
    return partitioned(nn.initializers.normal(config.initializer_range), *names)


def dense(config: ModelConfig, features: int, kernel_axes: tuple, *, use_bias: bool = True,
          name: str | None = None) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=config.compute_dtype,
                    param_dtype=jnp.float32, kernel_init=weight_init(config, *kernel_axes),
                    bias_init=partitioned(nn.initializers.zeros, kernel_axes[-1]), name=name)


def embed(config: ModelConfig, rows: int, row_axis: str, name: str | None = None) -> nn.Embed:
    return nn.Embed(rows, config.hidden_size, dtype=config.compute_dtype,
                    param_dtype=jnp.float32, embedding_init=weight_init(config, row_axis, "embed"),
                    name=name)


class MultiAxisDense(nn.Module):
    """A dense layer whose kernel keeps heads as their own axis (``[embed, heads, head_dim]`` in,
    ``[heads, head_dim, embed]`` out). The kernel is created at its full shape, not flattened
    and reshaped as ``nn.DenseGeneral`` does, so its logical axes stay valid under a mesh."""
    config: ModelConfig
    kernel_axes: tuple
    features: tuple
    equation: str

    @nn.compact
    def __call__(self, x):
        c = self.config
        inputs = x.shape[-(len(self.kernel_axes) - len(self.features)):]
        kernel = self.param("kernel", weight_init(c, *self.kernel_axes),
                            (*inputs, *self.features), jnp.float32)
        y = jnp.einsum(self.equation, x.astype(c.compute_dtype), kernel.astype(c.compute_dtype))
        if c.use_bias:
            bias_axes = self.kernel_axes[-len(self.features):]
            bias = self.param("bias", partitioned(nn.initializers.zeros, *bias_axes),
                              self.features, jnp.float32)
            y = y + bias.astype(c.compute_dtype)
        return y


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis. Statistics are taken in float32 (two-pass
    variance, as torch does) so low-precision compute does not lose them."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        size = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, "embed"), (size,),
                           jnp.float32)
        x32 = x.astype(jnp.float32)
        if c.norm == "rmsnorm":
            normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + c.norm_eps)
            # Llama casts back before scaling; doing the same keeps bf16 runs close to HF.
            return (normed.astype(c.compute_dtype) * scale).astype(c.compute_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, "embed"), (size,),
                          jnp.float32)
        centred = x32 - jnp.mean(x32, -1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, -1, keepdims=True)
                                         + c.norm_eps)
        return (normed * scale + bias).astype(c.compute_dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def rotate(x, theta: float):
    """Rotary position embedding over [batch, length, heads, head_dim], in HF Llama's
    half-split layout (pairs are (i, i + head_dim/2), not interleaved), at positions 0..L-1."""
    head_dim = x.shape[-1]
    inverse_frequency = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                                         / head_dim))
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inverse_frequency
    angles = jnp.concatenate([angles, angles], -1)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], -1)
    return (x32 * jnp.cos(angles) + rotated_half * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
    """Multi-head dot-product attention; ``num_kv_heads < num_heads`` gives GQA, where each
    key/value head serves a contiguous group of query heads (HF's ``repeat_kv`` order). The
    math is in :mod:`research.models.attention`, chosen by ``config.attention_impl``."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, rows: int | None = None):
        """``mask``: the :class:`research.models.attention.Mask` Stack builds. ``rows``:
        compute only the first ``rows`` query positions (all keys still count)."""
        c = self.config
        length = x.shape[1] if rows is None else rows

        def project(name, heads, heads_axis, inputs=x):
            return MultiAxisDense(c, ("embed", heads_axis, "head_dim"), (heads, c.head_dim),
                                  "...e,ehd->...hd", name=name)(inputs)

        query = constrain(project("query", c.num_heads, "heads", x[:, :length]),
                          "batch", "length", "heads", "head_dim")
        key = constrain(project("key", c.num_kv_heads, "kv_heads"),
                        "batch", "length", "kv_heads", "head_dim")
        value = constrain(project("value", c.num_kv_heads, "kv_heads"),
                          "batch", "length", "kv_heads", "head_dim")
        if c.rotary:
            query, key = rotate(query, c.rope_theta), rotate(key, c.rope_theta)

        rate = 0.0 if deterministic else c.attention_dropout
        rng = self.make_rng("dropout") if rate > 0 else None
        context = attend(query, key, value, mask, c.attention_impl, dropout_rate=rate,
                         dropout_rng=rng)
        context = constrain(context, "batch", "length", "heads", "head_dim")
        return MultiAxisDense(c, ("heads", "head_dim", "embed"), (c.hidden_size,),
                              "...hd,hde->...e", name="out")(context)


# ---------------------------------------------------------------------------------------------
# MLP, block, stack
# ---------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """GELU (exact, erf) MLP ``wo(gelu(wi x))`` or SwiGLU ``down(silu(gate x) * up x)``."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        def inner(name):
            return dense(c, c.mlp_dim, ("embed", "mlp"), use_bias=c.use_bias, name=name)(x)
        if c.mlp == "swiglu":
            hidden, out_name = nn.silu(inner("gate")) * inner("up"), "down"
        else:
            hidden, out_name = nn.gelu(inner("wi"), approximate=False), "wo"
        hidden = constrain(hidden, "batch", "length", "mlp")
        return dense(c, c.hidden_size, ("mlp", "embed"), use_bias=c.use_bias,
                     name=out_name)(hidden)


class Block(nn.Module):
    """Attention then MLP, each with a residual connection and a norm placed before the
    sublayer (pre-LN) or after the residual sum (post-LN). A sublayer in ``removed`` is
    skipped with its norm: the residual stream passes through it unchanged."""
    config: ModelConfig
    removed: tuple[str, ...] = ()  # of SUBLAYERS

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, rows: int | None = None):
        """``rows``: return only the first ``rows`` positions, computing nothing else (all
        positions are still attended to)."""
        c = self.config
        # Submodules create their params when first called, so a skipped one has none.
        attention, mlp = Attention(c, name="attn"), Mlp(c, name="mlp")
        attn_norm, mlp_norm = Norm(c, name="attn_norm"), Norm(c, name="mlp_norm")
        def drop(y):
            return Dropout(c.hidden_dropout)(y, deterministic=deterministic)
        kept = x[:, :rows] if rows is not None else x
        if "attn" in self.removed:
            x = kept
        elif c.pre_norm:
            x = kept + drop(attention(attn_norm(x), mask, deterministic, rows))
        else:
            x = attn_norm(kept + drop(attention(x, mask, deterministic, rows)))
        if "mlp" not in self.removed:
            x = x + drop(mlp(mlp_norm(x))) if c.pre_norm else mlp_norm(x + drop(mlp(x)))
        return constrain(x, "batch", "length", "embed")


# Set while a scanned stack traces its block: the path its modules stand for (see module_path).
_SCANNED_BLOCK = contextvars.ContextVar("scanned_block", default=None)


def module_path(module: nn.Module) -> str:
    """The tree path of ``module``'s params (``encoder/layer_3/attn/query``). Inside a scanned
    stack one traced block stands for every layer, and its modules read
    ``encoder/layer_*/attn/query`` (:func:`research.tree.layer_view`)."""
    prefix = _SCANNED_BLOCK.get()
    return tree.SEP.join((prefix, *module.path) if prefix else module.path)


def _compute_dtype(config: ModelConfig, leaf):
    """Matrices in the compute dtype (every layer casts them so anyway); vectors (norm scales,
    biases) as they are, since their math runs in float32."""
    if leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating):
        return leaf.astype(config.compute_dtype)
    return leaf


class Stack(nn.Module):
    """``num_layers`` blocks named ``layer_{i}``, then an optional ``final_norm`` (pre-LN
    models need one; post-LN models end normalised already).

    With ``scan_layers`` the params keep their per-layer names (every rule, method, converter
    and checkpoint sees ``layer_3``), but the step stacks the layers along a leading axis, in
    the compute dtype, and runs one block under ``jax.lax.scan`` (MaxText's layout), so the
    block is traced and compiled once whatever the depth. ``remat`` rematerialises each block
    in the backward pass, keeping what the policy saves; under the scan only one layer's
    activations and gathered weights are live at a time."""
    config: ModelConfig
    final_norm: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, last_rows: int | None = None):
        """``last_rows``: the last block computes (and the stack returns) only the first
        ``last_rows`` positions: a [CLS] classifier needs one, which saves most of that
        block's work (about 1/7 of a MiniLM step)."""
        c = self.config
        if x.shape[1] > c.max_length:
            raise ValueError(f"sequence length {x.shape[1]} exceeds the model's "
                             f"max_length={c.max_length} (model.overrides.max_length)")
        mask = make_mask(attention_mask, c.causal)
        x = constrain(x, "batch", "length", "embed")
        block = Block if c.remat == "none" else nn.remat(
            Block, policy=REMAT[c.remat], static_argnums=(3, 4))
        first = 0
        if c.scan_layers and not self.is_initializing():
            # The [CLS]-only last block differs in shape, so it runs on its own.
            first = c.num_layers - (last_rows is not None)
            x = self._scan(x, mask, deterministic, first)
        for index in range(first, c.num_layers):
            rows = last_rows if index == c.num_layers - 1 else None
            removed = tuple(s for s in SUBLAYERS if f"layer_{index}/{s}" in c.removed_sublayers)
            x = block(c, removed, name=f"layer_{index}")(x, mask, deterministic, rows)
        return Norm(c, name="final_norm")(x) if self.final_norm else x

    def _scan(self, x, mask, deterministic: bool, count: int):
        """Layers ``0 .. count-1`` as one scanned block over their stacked params."""
        c = self.config
        layers = [self.variables["params"][f"layer_{i}"] for i in range(count)]
        for index, layer in enumerate(layers[1:], 1):
            diff = tree.structural_diff(layers[0], layer)
            if any(diff.values()):
                kind, paths = next((k, v) for k, v in diff.items() if v)
                raise ValueError(f"config.model.scan_layers: layer_{index} differs from "
                                 f"layer_0 ({kind}: {paths[0]}); a scanned stack needs every "
                                 f"layer alike, so set config.model.scan_layers=False")
        stacked = jax.tree.map(lambda *leaves: jnp.stack([_compute_dtype(c, leaf)
                                                         for leaf in leaves]), *layers)
        keys = None if deterministic else jax.random.split(self.make_rng("dropout"), count)
        block = Block(c, parent=None)

        def body(carry, xs):
            params, key = xs
            rngs = {} if key is None else {"dropout": key}
            return block.apply({"params": params}, carry, mask, deterministic, rngs=rngs), None

        if c.remat != "none":
            body = jax.checkpoint(body, policy=REMAT[c.remat], prevent_cse=False)
        token = _SCANNED_BLOCK.set(tree.SEP.join((*self.path, tree.ANY_LAYER)))
        try:
            x, _ = jax.lax.scan(body, x, (stacked, keys))
        finally:
            _SCANNED_BLOCK.reset(token)
        return x
