"""Attention math: an einsum reference and fused attention (FlashAttention, Dao et al. 2022).

FlashAttention computes ``softmax(q·kᵀ/√d + mask)·v`` in tiles with an online softmax, so the
[query, key] score matrix never reaches device memory. The fused path here calls
``jax.nn.dot_product_attention``: cuDNN's flash kernel on GPU (:func:`implementation`), XLA's
path elsewhere. The
einsum path writes the same math out (explicit scores in float32, softmax, weighted sum) and is
the reference the fused one is tested against.

Both take query ``[batch, rows, heads, head_dim]`` and key/value ``[batch, length, kv_heads,
head_dim]`` (``rows <= length``: BERT's classifier computes only the first query row of its
last block) and a :class:`Mask`. With ``kv_heads < heads`` (GQA) each key/value head serves a
contiguous group of query heads, HF's ``repeat_kv`` order.

``jax.nn.dot_product_attention`` has no dropout, so a call that drops attention probabilities
(training with ``attention_dropout > 0``) runs the einsum path even when "fused" is asked
for; :func:`effective_impl` says which path a call runs.

A query row with nothing to attend to (all of it padding, or a left-padded causal row) is
the mean of the values in both paths, finite. Only its gradient differs: the einsum path's
additive bias (HF's) still passes that row's cotangent into q and k, the fused path's select
passes none. A loss that leaves padded positions out sees no difference.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from research.models.dropout import dropout

IMPLS = ("einsum", "fused")


def implementation(query) -> str:
    """``jax.nn.dot_product_attention``'s kernel for ``query``: cuDNN's flash attention on GPU
    where it applies (bf16/fp16, head_dim a multiple of 8), XLA's path elsewhere. Chosen here
    because jax 0.10.2's own default (None) always takes XLA's path."""
    if (jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16)
            and query.shape[-1] % 8 == 0):
        return "cudnn"
    return "xla"


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query may attend to: ``padding`` [batch, key] bool (True: a real
    token) or None, and ``causal`` (query i sees keys 0..i). ``causal`` is static pytree
    metadata, so a Mask passes through jit, scan and remat without becoming a tracer."""
    padding: jax.Array | None = None
    causal: bool = False


jax.tree_util.register_dataclass(Mask, data_fields=["padding"], meta_fields=["causal"])


def make_mask(attention_mask, causal: bool) -> Mask:
    """A Mask from a [batch, key] 0/1 ``attention_mask`` (or None: no padding)."""
    if attention_mask is None:
        return Mask(None, causal)
    if jnp.ndim(attention_mask) != 2:
        raise ValueError(f"attention_mask has shape {jnp.shape(attention_mask)}, "
                         f"not [batch, key]")
    return Mask(jnp.asarray(attention_mask).astype(bool), causal)


def allowed(mask: Mask | None, rows: int, length: int):
    """Bool [batch or 1, 1, rows, length]: where query row i may attend to key j; None when
    everything is allowed. Causal rows are the first ``rows`` of the square mask (top-left
    aligned, as XLA's ``is_causal`` is)."""
    if mask is None:
        return None
    result = None
    if mask.padding is not None:
        result = mask.padding[:, None, None, :]
    if mask.causal:
        lower = jnp.tril(jnp.ones((rows, length), bool))[None, None]
        result = lower if result is None else result & lower
    return result


def additive_bias(mask: Mask | None, rows: int, length: int):
    """Float32 [batch or 1, 1, rows, length]: 0 where allowed, float32's most negative value
    where not (HF's choice: unlike -inf, a row with nothing allowed stays finite, uniform over
    the keys, instead of turning into NaN). None when everything is allowed."""
    where = allowed(mask, rows, length)
    if where is None:
        return None
    return jnp.where(where, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def einsum_attention(query, key, value, mask: Mask | None = None, *, dropout_rate: float = 0.0,
                     dropout_rng=None):
    """The reference: scores and softmax in float32, probabilities cast to the compute dtype
    (``query.dtype``) and dropped out at ``dropout_rate`` with ``dropout_rng``.
    Returns [batch, rows, heads, head_dim]."""
    batch, rows, heads, head_dim = query.shape
    length, kv_heads = key.shape[1], key.shape[2]
    # Query head h reads key/value head h // groups (contiguous groups, not interleaved).
    grouped = query.reshape(batch, rows, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", grouped, key).astype(jnp.float32)
    scores = scores / math.sqrt(head_dim)
    bias = additive_bias(mask, rows, length)
    if bias is not None:
        scores = scores + bias[:, :, None]
    # Softmax in float32: bf16 exponentials over long rows lose most of their mass.
    probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
    if dropout_rate > 0:
        if dropout_rng is None:
            raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng")
        probs = dropout(dropout_rng, dropout_rate, probs)
    context = jnp.einsum("bkgqs,bskd->bqkgd", probs, value)
    return context.reshape(batch, rows, heads, head_dim)


def fused_attention(query, key, value, mask: Mask | None = None):
    """``jax.nn.dot_product_attention`` in BTNH layout, GQA native. Causal goes in as
    ``is_causal`` rather than a materialised mask, so cuDNN can run its causal kernel (which
    skips the masked tiles); padding goes in as a boolean mask. No dropout."""
    mask = mask or Mask()
    padding = None if mask.padding is None else mask.padding[:, None, None, :]
    return jax.nn.dot_product_attention(query, key, value, mask=padding, is_causal=mask.causal,
                                        implementation=implementation(query))


def effective_impl(impl: str, dropout_rate: float) -> str:
    """The path a call with ``impl`` runs: "fused" has no dropout, so it runs "einsum" while
    attention probabilities are dropped out (``dropout_rate > 0``)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    return "einsum" if dropout_rate > 0 else impl


def attend(query, key, value, mask: Mask | None, impl: str, *, dropout_rate: float = 0.0,
           dropout_rng=None):
    """Attention by ``impl`` (one of :data:`IMPLS`); ``dropout_rate`` is 0 when deterministic."""
    if effective_impl(impl, dropout_rate) == "fused":
        return fused_attention(query, key, value, mask)
    return einsum_attention(query, key, value, mask, dropout_rate=dropout_rate,
                            dropout_rng=dropout_rng)
