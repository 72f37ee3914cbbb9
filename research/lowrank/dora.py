"""DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): split each adapted
weight into a magnitude and a direction, learn the magnitude directly and the direction by LoRA:
``W' = m · (W + s·A·B) / ||W + s·A·B||``, the norm taken per output feature over the input axes
(PEFT's ``weight_norm`` over dim 1 of torch's ``[out, in]`` weight; here one value per entry of
the kernel's output axes, so ``[heads, head_dim]`` for a query kernel).

As a tree transform: :class:`DoRA` is :class:`~research.lowrank.lora.LoRA` plus one trainable
leaf ``dora_m`` beside each factor pair, shaped like the kernel's output axes and initialised to
``||W + s·A·B||`` (``= ||W||`` when B starts at zero), so the model is unchanged at step 0. The
adapted layer computes ``(m / ||W + s·A·B||) ⊙ (x·W + s·(x·A)·B) + bias``: ``W + s·A·B`` is
formed only inside the norm, and, as the paper suggests (§4.3) and PEFT does, the norm is a
constant for the backward pass, so a frozen kernel still gets no weight gradient.
Dropout, if any, acts on the low-rank path's input only (PEFT also routes the dropped input
through ``W``'s rescaled part; the two agree whenever dropout is off).

:func:`merge` folds everything into the kernel; :mod:`research.lowrank.peft` reads and writes
the magnitudes as PEFT's ``lora_magnitude_vector`` (``use_dora=True``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import sites, tree
from research.lowrank import lora
from research.lowrank.lora import A, B, FACTOR_PATTERN, LoRA, factor_pairs
from research.methods import register

MAGNITUDE = "dora_m"
MAGNITUDE_PATTERN = rf"(.*/)?{MAGNITUDE}"


def magnitude_path(target: str) -> str:
    """``.../query/kernel`` -> ``.../query/dora_m``."""
    return sites.join(sites.parent(target), MAGNITUDE)


def strip_magnitudes(flat: Mapping[str, Any]) -> dict[str, Any]:
    return {p: v for p, v in flat.items() if p.rpartition(tree.SEP)[2] != MAGNITUDE}


def _adapted(kernel, a, b, scale):
    """``W + s·A·B`` in float32."""
    return kernel.astype(jnp.float32) + scale * jnp.tensordot(
        a.astype(jnp.float32), b.astype(jnp.float32), 1, precision=jax.lax.Precision.HIGHEST)


def _norm(weight, n_in: int):
    return jnp.sqrt(jnp.sum(weight * weight, axis=tuple(range(n_in))))


def weight_norm(kernel, a, b, scale):
    """``||W + s·A·B||`` over the kernel's input axes (those of ``A`` but its rank), float32."""
    return _norm(_adapted(kernel, a, b, scale), a.ndim - 1)


@register("dora")
@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA options: LoRA's (``config.method = dict(name='dora', targets=..., ...)``). Targets
    must be kernels of ``nn.Dense`` or ``MultiAxisDense`` layers; by default the factors and
    the magnitudes train."""

    adapter_leaves: ClassVar[tuple] = (FACTOR_PATTERN, MAGNITUDE_PATTERN)

    def plan(self, params) -> dict[str, lora.Target]:
        plan = super().plan(params)
        for path in plan:
            if path.endswith("embedding"):
                raise ValueError(f"DoRA adapts kernels; {path} is an embedding table "
                                 f"(give it rank 0)")
        return plan

    def init(self, rng, params: dict, stats=None) -> dict:
        """LoRA's factors, then ``m = ||W + s·A·B||`` beside each pair lacking one."""
        params = super().init(rng, params, stats)
        flat = dict(tree.flatten(params))
        scales = tree.flatten(self.scales(params))
        for path, pair in factor_pairs(flat).items():
            if magnitude_path(path) not in flat:
                norm = weight_norm(flat[path], flat[pair.a], flat[pair.b], scales[path])
                flat[magnitude_path(path)] = norm.astype(flat[path].dtype)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """Factors as in LoRA; the magnitude takes the kernel's output axes."""
        flat_logical = dict(tree.flatten(super().logical_axes(logical, shapes)))
        flat_shapes = tree.flatten(shapes)
        for path, pair in factor_pairs(flat_shapes).items():
            if magnitude_path(path) in flat_shapes:
                axes = tuple(flat_logical.get(path) or ())
                axes = axes + (None,) * (len(flat_shapes[path].shape) - len(axes))
                flat_logical[magnitude_path(path)] = axes[len(flat_shapes[pair.a].shape) - 1:]
        return tree.unflatten(flat_logical)

    def combine(self, layer: nn.Module, y, delta, scale: float):
        """``(m / ||W + s·A·B||) ⊙ (x·W + s·(x·A)·B) + bias`` from the layer's own output
        ``y = x·W + bias``; the norm is held constant for the backward pass."""
        if isinstance(layer, nn.Embed) or not layer.has_variable("params", MAGNITUDE):
            path = tree.SEP.join(layer.path)
            raise ValueError(f"DoRA layer {path} ({type(layer).__name__}) has no {MAGNITUDE} "
                             f"beside its factors (DoRA.init adds it; embeddings are not "
                             f"adapted)")
        def get(name):
            return layer.get_variable("params", name)
        norm = jax.lax.stop_gradient(weight_norm(get("kernel"), get(A), get(B), scale))
        gain = (get(MAGNITUDE) / norm).astype(y.dtype)
        bias = get("bias").astype(y.dtype) if layer.has_variable("params", "bias") else 0
        return gain * (y - bias + delta.astype(y.dtype)) + bias

    def export(self, params: dict) -> dict:
        return merge(params, self)


def merge(params, scales) -> dict:
    """Fold ``m · (W + s·A·B) / ||W + s·A·B||`` into each adapted kernel and drop the factors
    and magnitudes. ``scales``: the DoRA method, a scale tree or one number (as LoRA's)."""
    flat = dict(tree.flatten(params))
    pairs = factor_pairs(flat)
    s = lora.scale_map(scales, params, pairs)
    for path, pair in pairs.items():
        if magnitude_path(path) not in flat:
            raise ValueError(f"DoRA merge: {path} has factors but no {magnitude_path(path)}")
        kernel, a, b = flat[path], flat.pop(pair.a), flat.pop(pair.b)
        weight = _adapted(kernel, a, b, s[path])
        gain = flat.pop(magnitude_path(path)) / _norm(weight, a.ndim - 1)
        flat[path] = (gain * weight).astype(kernel.dtype)
    return tree.unflatten(flat)
