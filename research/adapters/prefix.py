"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"): the model stays frozen and every attention layer gets ``n`` trained key and value
rows in front of its own, which every real token attends to as if ``n`` virtual tokens came first.

Semantics are PEFT's (``prefix_projection=False``: the prefixes are the trained parameters
themselves, drawn N(0, 1) as torch's ``nn.Embedding``), where the prefixes are a past key/value
cache: transformers writes a cached key as it is (a rotary model rotated it once, when it was
cached) and numbers the real tokens from ``n`` on. So BERT's learned positions start at ``n``;
Llama rotates its queries and keys at ``n .. n+L-1`` and never the prefix; a causal row ``i``
sees all prefixes and real keys ``<= i``; the padding mask gains ``n`` leading ones (PEFT
extends a given mask only). Each layer's prefix is ``[n, kv_heads, head_dim]`` (GQA: one per
key/value head), a param beside the key or value kernel (``attn/key/prefix``), so a scanned
stack carries it like the kernels.

Interception only (:mod:`research.sites`), no model edit: the stack's mask grows; the learned
position lookups shift by ``n``; the key and value projections' outputs get the prefix in front.
Rotation and the causal mask sit inside ``Attention`` between projection and attention, so a
causal or rotary model also gets ``n`` zero query rows in front (rotated at ``0..n-1``, so the
real ones sit at ``n..``, and the top-left causal mask then lets row ``n+i`` see every prefix),
dropped again before the output projection; and the key prefix goes in counter-rotated
(``R(-p)``, ``p = 0..n-1``), so the model's own rotation leaves it as it was.

PEFT's table (``prompt_embeddings``) is ``[n, layers·2·kv_heads·head_dim]``, viewed as
``[n, layers·2, kv_heads, head_dim]`` with rows ``2l`` and ``2l+1`` layer ``l``'s key and value:
:func:`to_peft_table` and :func:`from_peft_table`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from research import sites, tree
from research.methods import Applied, Method, register
from research.models.layers import module_path

PREFIX = "prefix"
SIDES = ("key", "value")  # PEFT's order within a layer


def check_length(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} num_virtual_tokens={value!r} is not a positive integer")


def _prepend(x, rows):
    """``x [B, L, ...]`` with ``rows [n, ...]`` (or ``[B, n, ...]``) in front."""
    rows = jnp.broadcast_to(rows, (x.shape[0], *rows.shape[-(x.ndim - 1):])).astype(x.dtype)
    return jnp.concatenate([rows, x], axis=1)


def counter_rotate(prefix, theta: float):
    """``R(-p)·k`` for rows ``p = 0..n-1`` of ``prefix [n, heads, head_dim]`` (HF's half-split
    rotary layout, as :func:`research.models.layers.rotate`), which that rotation undoes."""
    head_dim = prefix.shape[-1]
    inverse_frequency = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                                         / head_dim))
    angles = jnp.arange(prefix.shape[0], dtype=jnp.float32)[:, None] * inverse_frequency
    angles = jnp.concatenate([angles, angles], -1)[:, None, :]
    x32 = prefix.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], -1)
    return x32 * jnp.cos(angles) - rotated_half * jnp.sin(angles)


@register("prefix_tuning")
@dataclasses.dataclass(frozen=True)
class PrefixTuning(Method):
    """Prefix tuning options (``config.method = dict(name='prefix_tuning', ...)``).

    num_virtual_tokens: ``n``, the prefix rows of every layer (PEFT's name).
    encoder: the layer stack (``encoder`` for BERT, ``decoder`` for Llama): every
        ``layer_{i}/attn`` in it gets prefixes, and its ``attention_mask`` grows.
    positions: the learned absolute position table whose lookups start at ``n`` (BERT's;
        ignored by a rotary model, which has none; None leaves positions alone).
    prefix_projection: PEFT's MLP reparameterisation; only False (the prefixes train directly).
    also_train: extra path regexes that train (the classifier, PEFT's ``modules_to_save``).
    Trainable: ``layers·2·n·kv_heads·head_dim`` plus ``also_train``.
    """

    num_virtual_tokens: int = 20
    encoder: str = "encoder"
    positions: str | None = "embeddings/position/embedding"
    prefix_projection: bool = False
    also_train: tuple = ()

    def __post_init__(self):
        check_length("prefix_tuning", self.num_virtual_tokens)
        if self.prefix_projection:
            raise ValueError("prefix_tuning prefix_projection=True is not supported (only "
                             "False: the prefixes themselves train)")
        object.__setattr__(self, "also_train", tuple(self.also_train or ()))
        if self.trainable is None:
            object.__setattr__(self, "trainable", (*self.own_leaves(), *self.also_train))

    def own_leaves(self) -> tuple[str, ...]:
        """Regexes of the method's own leaves."""
        return (rf"{re.escape(self.encoder)}/layer_\d+/attn/(key|value)/{PREFIX}",)

    def attentions(self, params) -> list[str]:
        """The stack's attention modules (``encoder/layer_3/attn``), in layer order. A stack
        without any is a one-line error naming ``encoder``."""
        pattern = re.compile(rf"{re.escape(self.encoder)}/layer_(\d+)/attn/key/kernel")
        flat = tree.flatten(params)
        found = sorted((int(match[1]), sites.parent(sites.parent(path))) for path in flat
                       if (match := pattern.fullmatch(path))
                       and sites.join(sites.parent(sites.parent(path)), "value/kernel") in flat)
        if not found:
            near = ", ".join(tree.closest_paths(f"{self.encoder}/layer_0/attn/key/kernel", flat))
            raise ValueError(f"prefix_tuning encoder={self.encoder!r} holds no attention "
                             f"(no {self.encoder}/layer_{{i}}/attn/key and value kernels); "
                             f"closest: {near}")
        return [path for _, path in found]

    def prefix_shape(self, flat: dict, attention: str) -> tuple[int, int, int]:
        """``[n, kv_heads, head_dim]``: the key kernel's output axes."""
        kernel = flat[f"{attention}/key/kernel"]
        if len(kernel.shape) != 3:
            raise ValueError(f"prefix_tuning: {attention}/key/kernel {tuple(kernel.shape)} is "
                             f"not [embed, kv_heads, head_dim]")
        return (self.num_virtual_tokens, *kernel.shape[1:])

    def table_width(self, params) -> int:
        """PEFT's ``prompt_embeddings`` width, ``layers·2·kv_heads·head_dim``."""
        flat = tree.flatten(params)
        return sum(2 * int(np.prod(self.prefix_shape(flat, a)[1:])) for a in self.attentions(flat))

    def init(self, rng, params: dict, stats=None) -> dict:
        """Every layer's prefixes, N(0, 1) as PEFT's ``nn.Embedding`` table."""
        del stats
        flat = dict(tree.flatten(params))
        table = jax.random.normal(rng, (self.num_virtual_tokens, self.table_width(flat)))
        flat.update(from_peft_table(self, flat, table, "init"))
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        flat = dict(tree.flatten(logical))
        for path in tree.flatten(shapes):
            if re.fullmatch(self.own_leaves()[0], path):
                flat[path] = (None, "kv_heads", "head_dim")
        return tree.unflatten(flat)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        flat = tree.flatten(variables["params"])
        n = self.num_virtual_tokens
        for attention in self.attentions(flat):
            for side in SIDES:
                path = f"{attention}/{side}/{PREFIX}"
                if path not in flat:
                    raise ValueError(f"prefix_tuning prefix {path!r} is not in the params "
                                     f"(run init first)")
                if tuple(flat[path].shape) != self.prefix_shape(flat, attention):
                    raise ValueError(f"prefix_tuning: the params' {path} is "
                                     f"{tuple(flat[path].shape)}, not "
                                     f"{self.prefix_shape(flat, attention)} for "
                                     f"num_virtual_tokens={n}")
        config = module.config
        positions = None
        if self.positions is not None and not config.rotary:
            if self.positions not in flat:
                near = ", ".join(tree.closest_paths(self.positions, flat))
                raise ValueError(f"prefix_tuning positions={self.positions!r} is not a "
                                 f"parameter (None: leave positions alone); closest: {near}")
            positions = sites.parent(self.positions)
        # A causal or rotary model needs the n extra query rows (see the module docstring).
        shift = config.causal or config.rotary
        attention = re.compile(rf"{re.escape(self.encoder)}/layer_(\d+|\*)/attn/"
                               rf"({'|'.join(SIDES)}{'|query|out' if shift else ''})")

        def where(layer) -> bool:
            path = module_path(layer)
            return path in (self.encoder, positions) or bool(attention.fullmatch(path))

        handler = functools.partial(_with_prefix, n=n, stack=self.encoder, positions=positions,
                                    max_length=config.max_length)
        with sites.intercept(handler, where):
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """The params as they are: the prefixes cannot fold into the weights, so they stay
        beside the key and value kernels."""
        return params


def _with_prefix(call: sites.Call, n: int, stack: str, positions: str | None, max_length: int):
    if call.path == stack:  # (x, attention_mask, deterministic, ...)
        x, mask, *rest = call.args
        if n + x.shape[1] > max_length:
            raise ValueError(f"sequence length {x.shape[1]} plus num_virtual_tokens={n} "
                             f"exceeds the model's max_length={max_length}")
        if mask is not None:
            mask = _prepend(mask, jnp.ones((n,), mask.dtype))
        return call.run(x, mask, *rest, **call.kwargs)
    if call.path == positions:  # (positions,): the real tokens sit at n..
        return call.run(call.inputs + n, *call.args[1:], **call.kwargs)
    name = sites.leaf(call.path)
    if name == "query":  # zero rows in front, dropped again at "out"
        y = call.output()
        return _prepend(y, jnp.zeros((n, *y.shape[2:]), y.dtype))
    if name == "out":
        return call.run(call.inputs[:, n:], *call.args[1:], **call.kwargs)
    prefix = call.param(PREFIX)
    if name == "key" and call.layer.config.rotary:
        prefix = counter_rotate(prefix, call.layer.config.rope_theta)
    return _prepend(call.output(), prefix)


# ---------------------------------------------------------------------------------------------
# PEFT's prompt_embeddings table
# ---------------------------------------------------------------------------------------------


def to_peft_table(method: PrefixTuning, flat: dict) -> np.ndarray:
    """PEFT's ``[n, layers·2·kv_heads·head_dim]`` table of ``flat``'s prefixes."""
    columns = []
    for attention in method.attentions(flat):
        for side in SIDES:
            path = f"{attention}/{side}/{PREFIX}"
            if path not in flat:
                raise ValueError(f"prefix_tuning prefix {path!r} is not in the params "
                                 f"(run init first)")
            value = np.asarray(flat[path], np.float32)
            columns.append(value.reshape(value.shape[0], -1))
    return np.concatenate(columns, axis=1)


def from_peft_table(method: PrefixTuning, flat: dict, table, source: str) -> dict:
    """``{prefix path: [n, kv_heads, head_dim]}`` from PEFT's table; a table that does not fit
    the model is a one-line error naming ``source`` (the weights file)."""
    attentions = method.attentions(flat)
    shapes = [method.prefix_shape(flat, a) for a in attentions]
    want = (method.num_virtual_tokens, sum(2 * int(np.prod(s[1:])) for s in shapes))
    if tuple(table.shape) != want:
        raise ValueError(f"{source}: prompt_embeddings {tuple(table.shape)} does not fit "
                         f"num_virtual_tokens={want[0]} and this model's {len(attentions)} "
                         f"layers of key/value heads ({want[0]}, {want[1]})")
    out, start = {}, 0
    for attention, shape in zip(attentions, shapes):
        width = int(np.prod(shape[1:]))
        for side in SIDES:
            rows = table[:, start:start + width].reshape(shape)
            out[f"{attention}/{side}/{PREFIX}"] = jnp.asarray(rows, jnp.float32)
            start += width
    return out
