"""QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): LoRA over a
frozen base stored in 4-bit NormalFloat (NF4) or int8, dequantised inside each layer's matmul.

Each quantised kernel ``W`` becomes two frozen leaves beside it: the codes and one absmax per
block of ``block_size`` entries along the kernel's last axis (QLoRA's blockwise quantisation,
block 64). NF4's 16 levels are the quantiles of a standard normal rescaled to [-1, 1] (the
paper's table, as bitsandbytes stores it); two codes share a byte, so a float32 kernel shrinks
to 0.5 + 4/64 bytes per entry (≈ 0.14 of float32), int8 to ≈ 0.27. The codes keep the kernel's
leading axes, so its sharding rules still apply. The absmax stays unquantised (the paper's
double quantisation of it saves another 0.37 bits per entry; not done here).

In the step every quantised layer computes ``x·deq(W) + b`` (the dequantised kernel exists only
inside that layer, in the compute dtype) and LoRA adds ``s·(x·A)·B``; no gradient reaches the
codes. :meth:`QLoRA.export` gives plain params: dequantised kernels with the LoRA update merged.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from research import sites, tree
from research.lowrank.lora import LoRA
from research.methods import Applied, register

# The NF4 levels (QLoRA, appendix E; bitsandbytes' table), ascending.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
FORMATS = ("nf4", "int8")
ABSMAX = "kernel_absmax"
DEFAULT_QUANTIZE = (r"(encoder|decoder)/.*/kernel",)  # every linear layer of the stack


def codes_name(quant: str) -> str:
    return f"kernel_{quant}"


def _blocks(kernel, block_size: int):
    """``kernel [..., out]`` as ``[..., out / b, b]`` with ``b = min(block_size, out)``."""
    out = kernel.shape[-1]
    size = min(block_size, out)
    if out % size:
        raise ValueError(f"QLoRA block_size={block_size}: a kernel's last axis of {out} is not "
                         f"a multiple of {size}")
    return kernel.reshape(*kernel.shape[:-1], out // size, size)


def quantize(kernel, quant: str, block_size: int = 64) -> tuple[jax.Array, jax.Array]:
    """``(codes, absmax)`` of ``kernel``: per block, the nearest level to ``w / absmax``
    (NF4: index into :data:`NF4`, two per byte, low nibble first; int8: ``round(127·w/absmax)``)."""
    blocks = _blocks(jnp.asarray(kernel, jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    unit = blocks / jnp.where(absmax > 0, absmax, 1.0)
    if quant == "int8":
        codes = jnp.round(unit * 127).astype(jnp.int8).reshape(kernel.shape)
    else:
        index = jnp.argmin(jnp.abs(unit[..., None] - jnp.asarray(NF4)), axis=-1)
        index = index.astype(jnp.uint8).reshape(*kernel.shape[:-1], -1, 2)
        codes = index[..., 0] | (index[..., 1] << 4)
    return codes, absmax[..., 0]


def dequantize(codes, absmax, quant: str, dtype=jnp.float32):
    """The kernel that ``(codes, absmax)`` stand for, in ``dtype``."""
    if quant == "int8":
        unit = codes.astype(dtype) / 127
    else:
        low, high = codes & 0xF, codes >> 4
        index = jnp.stack([low, high], axis=-1).reshape(*codes.shape[:-1], -1)
        unit = jnp.asarray(NF4, dtype)[index]
    blocks = unit.reshape(*absmax.shape, -1) * absmax[..., None].astype(dtype)
    return blocks.reshape(unit.shape)


@register("qlora")
@dataclasses.dataclass(frozen=True)
class QLoRA(LoRA):
    """QLoRA options: LoRA's (``targets``, ``alpha``...) plus

    quant: 'nf4' (default) or 'int8'.
    quantize: path regexes of the kernels stored quantised (default every kernel of the
        stack; heads stay as they are).
    block_size: entries per absmax along a kernel's last axis (64 as in the paper).
    """

    quant: str = "nf4"
    quantize: tuple = DEFAULT_QUANTIZE
    block_size: int = 64
    # Its layers are found by the leaves they hold, never by path.
    scannable: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.quant not in FORMATS:
            raise ValueError(f"config.method.quant={self.quant!r} is not one of {FORMATS}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"config.method.block_size={self.block_size!r} is not a positive "
                             f"integer")
        object.__setattr__(self, "quantize", tuple(self.quantize or ()))

    @property
    def codes(self) -> str:
        return codes_name(self.quant)

    def quantized(self, params) -> list[str]:
        """The kernel paths of ``params`` (float kernels) that are stored quantised."""
        flat = tree.flatten(params)
        kernels = [p for p in flat if sites.leaf(p) == "kernel"]
        chosen = tree.resolve_rules([(p, True) for p in self.quantize], kernels, default=False,
                                    what="config.method.quantize pattern")
        return [p for p in kernels if chosen[p] is True]

    def _as_float_shapes(self, params) -> dict:
        """``params`` with each quantised kernel's leaves read as one ``kernel`` of its shape
        (what LoRA's bookkeeping expects), no data touched."""
        flat = dict(tree.flatten(params))
        for path in [p for p in flat if sites.leaf(p) == self.codes]:
            codes, module = flat.pop(path), sites.parent(path)
            flat.pop(sites.join(module, ABSMAX))
            last = codes.shape[-1] * (2 if self.quant == "nf4" else 1)
            flat[sites.join(module, "kernel")] = jax.ShapeDtypeStruct(
                (*codes.shape[:-1], last), jnp.float32)
        return flat

    def scales(self, params) -> dict:
        return super().scales(tree.unflatten(self._as_float_shapes(params)))

    def init(self, rng, params: dict, stats=None) -> dict:
        """LoRA's factors (from the float kernels), then every chosen kernel quantised."""
        chosen = self.quantized(params)
        if self.quant == "nf4":
            odd = [p for p in chosen if tree.flatten(params)[p].shape[-1] % 2]
            if odd:
                raise ValueError(f"QLoRA nf4 packs two codes a byte; {odd[0]} has an odd last "
                                 f"axis (use quant='int8' or leave it out of quantize)")
        flat = dict(tree.flatten(super().init(rng, params, stats)))
        for path in chosen:
            module = sites.parent(path)
            codes, absmax = quantize(flat.pop(path), self.quant, self.block_size)
            flat[sites.join(module, self.codes)] = codes
            flat[sites.join(module, ABSMAX)] = absmax
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """Factors as LoRA's; codes take their kernel's axes, the absmax all but the last."""
        flat_logical = dict(tree.flatten(super().logical_axes(
            logical, tree.unflatten(self._as_float_shapes(shapes)))))
        for path in [p for p in tree.flatten(shapes) if sites.leaf(p) == self.codes]:
            module = sites.parent(path)
            axes = tuple(flat_logical.pop(sites.join(module, "kernel"), None) or ())
            flat_logical[path] = axes or None
            flat_logical[sites.join(module, ABSMAX)] = (*axes[:-1], None) if axes else None
        return tree.unflatten(flat_logical)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """Every quantised layer runs on its dequantised kernel; LoRA's path is added on top
        (its interception outside, so it sees the dequantised layer's output)."""
        dequantised = sites.intercept(lambda call: _dequantised(call, self.quant),
                                      sites.holding(self.codes, ABSMAX))
        with self.low_rank_paths(module, variables["params"], kwargs), dequantised:
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """Plain float params: dequantised kernels (float32) with the LoRA update merged."""
        flat = dict(tree.flatten(params))
        for path in [p for p in flat if sites.leaf(p) == self.codes]:
            module = sites.parent(path)
            flat[sites.join(module, "kernel")] = dequantize(
                flat.pop(path), flat.pop(sites.join(module, ABSMAX)), self.quant)
        return super().export(tree.unflatten(flat))


def _dequantised(call: sites.Call, quant: str):
    """The layer's output on its dequantised kernel (it holds no float kernel to run on)."""
    absmax = call.param(ABSMAX)
    dtype = call.dtype(jnp.zeros((), jnp.float32))
    kernel = dequantize(call.param(codes_name(quant)), absmax, quant, dtype)
    y = jnp.tensordot(call.inputs.astype(dtype), kernel, call.input_axes)
    if call.has("bias"):
        y = y + call.param("bias").astype(dtype)
    return y
