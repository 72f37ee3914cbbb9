"""PEGO (Hu et al., 2024, "Learn to Preserve and Diversify: Parameter-Efficient Group with
Orthogonal Regularization for Domain Generalization"): a group of K LoRA modules at each target
kernel, whose updates add, trained with an orthogonality regulariser so that the modules keep
away from the pretrained weights (preserve) and from each other (diversify).

Layout: the K modules are stored concatenated, as one LoRA pair of rank ``K·r`` (``lora_a``
``[*inputs, K·r]`` holds ``[A_1 .. A_K]``, ``lora_b`` ``[K·r, *outputs]`` holds
``[B_1; ..; B_K]``), because ``Σ_k s·(x·A_k)·B_k = s·(x·A_cat)·B_cat``: the forward pass is
LoRA's single low-rank path (custom VJP, no ``W + ΔW`` formed), and LoRA's init (kaiming A with
the same fan-in bound per module, B = 0), merge, unmerge and PEFT export all apply unchanged to
:attr:`PEGO.lora`, the equivalent LoRA (alpha ``K·alpha``, so its scale ``K·alpha / (K·r)`` is
each module's ``alpha / r``). Only the regulariser sees the K blocks.

The regulariser (term ``orthogonality``, times ``orthogonality_weight``), summed over layers,
with ``ΔW_k = s·A_k·B_k`` in our ``[in, out]`` layout:

- ``'paper'`` (default): what the authors' released code trains (DomainBed ``PEGO.update``,
  ``ld = 1e-3``), in its torch ``[out, in]`` layout ``Σ_k |W ΔW_kᵀ|₁ + Σ_{i<j} |ΔW_i ΔW_jᵀ|₁``,
  i.e. ``Σ_k |Wᵀ ΔW_k|₁ + Σ_{i<j} |ΔW_iᵀ ΔW_j|₁`` here (entrywise L1; the products contract the
  input axis). The first sum keeps each module's input directions away from those the
  pretrained W reads (preserve), the second keeps the modules' input directions apart
  (diversify: zero when ``A_iᵀA_j = 0``). It vanishes at B = 0, so it acts once updates grow.
- ``'gram'``: ``||A_catᵀ A_cat - I||²_F``, the soft orthonormality of all ``K·r`` columns of A
  (the modules' A blocks orthogonal to each other and each orthonormal within itself). It
  does not need W or B, and driving it to zero makes the A blocks' Gram matrix the identity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from research import tree
from research.lowrank import lora as lora_lib
from research.lowrank.init import as_matrix
from research.lowrank.lora import LoRA
from research.methods import Applied, Method, register

REGULARISERS = ("paper", "gram")


def _l1(x):
    # |x| with subgradient 0 at 0, as torch's: jnp.abs has gradient 1 there, which would push
    # the zero-initialised B factors in a fixed direction before any update exists.
    return jnp.sum(x * jax.lax.stop_gradient(jnp.sign(x)))


@register("pego")
@dataclasses.dataclass(frozen=True)
class PEGO(Method):
    """PEGO options (``config.method = dict(name='pego', ...)``).

    targets: ordered ``(regex, rank)`` rules over kernel (and embedding) paths, first match
        wins, as LoRA's; the rank is each module's ``r`` (rank 0 or None: not adapted).
    modules: K, the number of LoRA modules at each target.
    alpha: each module's scale is ``alpha / r``.
    orthogonality_weight: weight of the regulariser (the paper's ``ld``, 1e-3 in its runs).
    regulariser: 'paper' or 'gram' (see the module docstring).
    also_train: extra path regexes that train; ``trainable``, when given, replaces the default
        (the factors plus ``also_train``).
    input_axes: ``(regex, n)`` rules saying how many leading kernel axes are inputs.
    """

    targets: tuple = ()
    modules: int = 4
    alpha: float = 8.0
    orthogonality_weight: float = 1e-3
    regulariser: str = "paper"
    also_train: tuple = ()
    input_axes: tuple = lora_lib.DEFAULT_INPUT_AXES

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("targets", "input_axes"):
            set_(self, name, tuple(tuple(r) if isinstance(r, list) else r
                                   for r in (getattr(self, name) or ())))
        set_(self, "also_train", tuple(self.also_train or ()))
        if not self.targets:
            raise ValueError("PEGO needs targets: (regex, rank) rules over kernel paths")
        if not isinstance(self.modules, int) or self.modules < 1:
            raise ValueError(f"PEGO modules={self.modules!r} is not a positive integer")
        if self.regulariser not in REGULARISERS:
            raise ValueError(f"PEGO regulariser={self.regulariser!r} is not one of "
                             f"{REGULARISERS}")
        if not self.orthogonality_weight >= 0:
            raise ValueError(f"PEGO orthogonality_weight={self.orthogonality_weight!r} is "
                             f"not >= 0")
        set_(self, "trainable", self.lora.trainable if self.trainable is None
             else tuple(self.trainable))

    @property
    def lora(self) -> LoRA:
        """The equivalent single LoRA: rank ``K·r``, alpha ``K·alpha``."""
        k = self.modules
        targets = tuple((pattern, rank * k if rank else rank) for pattern, rank in self.targets)
        return LoRA(targets=targets, alpha=self.alpha * k, also_train=self.also_train,
                    input_axes=self.input_axes)

    def blocks(self, params) -> dict[str, tuple]:
        """``{adapted path: (W [in, out], A [K, in, r], B [K, r, out], s)}`` as 2-D blocks."""
        flat, k = tree.flatten(params), self.modules
        scales = tree.flatten(self.scales(params))
        out = {}
        for path, pair in lora_lib.factor_pairs(flat).items():
            a, b = flat[pair.a], flat[pair.b]
            if a.shape[-1] % k:
                raise ValueError(f"PEGO factor {pair.a} {a.shape}: rank {a.shape[-1]} is not "
                                 f"a multiple of modules={k}")
            r = a.shape[-1] // k
            a3 = jnp.moveaxis(a.reshape(-1, k, r), 1, 0).astype(jnp.float32)
            b3 = b.reshape(k, r, -1).astype(jnp.float32)
            out[path] = (as_matrix(flat[path], a.ndim - 1), a3, b3, scales[path])
        return out

    def scales(self, params) -> dict:
        return self.lora.scales(params)

    def orthogonality(self, params):
        """The unweighted regulariser, summed over adapted layers."""
        total = jnp.zeros((), jnp.float32)
        for w, a, b, s in self.blocks(params).values():
            if self.regulariser == "gram":
                a_cat = jnp.concatenate(list(a), axis=1)
                gram = a_cat.T @ a_cat
                total += jnp.sum(jnp.square(gram - jnp.eye(gram.shape[0], dtype=gram.dtype)))
                continue
            # Wᵀ·ΔW_k = s·(Wᵀ A_k)·B_k; ΔW_iᵀ ΔW_j = s²·B_iᵀ (A_iᵀ A_j) B_j.
            total += _l1(s * jnp.einsum("io,kir,krp->kop", w, a, b))
            for i in range(self.modules):
                for j in range(i + 1, self.modules):
                    total += _l1(s * s * b[i].T @ (a[i].T @ a[j]) @ b[j])
        return total

    # --- the Method interface: LoRA's, plus the regulariser ---------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        return self.lora.init(rng, params, stats)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        return self.lora.logical_axes(logical, shapes)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        outputs = self.lora.apply(module, variables, *args, **kwargs).outputs
        if not self.orthogonality_weight:
            return Applied(outputs)
        return Applied(outputs, {"orthogonality": self.orthogonality_weight
                                 * self.orthogonality(variables["params"])})

    def export(self, params: dict) -> dict:
        return self.lora.export(params)
