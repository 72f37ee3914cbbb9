"""LoKr (Edalati et al., 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter"), as
the LyCORIS tuner PEFT ships: freeze ``W`` and learn ``ΔW = (W1 ⊗ W2) · alpha / r``, a
Kronecker product of a small ``[a, c]`` and a larger ``[b, d]`` matrix with ``out = a·b`` and
``in = c·d``: a full-rank update from ``ac + bd`` parameters.

As PEFT 0.21 does it: ``out`` and ``in`` are split by :func:`factorization` (divisors near the
square root, or ``decompose_factor``). ``W2`` is one matrix ``lokr_w2`` when ``r`` is at least
half its larger side, else ``lokr_w2_a [b, r] · lokr_w2_b [r, d]``; ``W1`` likewise
(``lokr_w1`` or ``lokr_w1_a · lokr_w1_b``) only under ``decompose_both``. With PEFT's default
``init_weights=True``, ``W1`` (or ``lokr_w1_a``) starts at zero and the rest
``kaiming_uniform``; 'lycoris' zeroes ``W2`` (or ``lokr_w2_b``) instead: either way ``ΔW = 0``
at step 0. Planning, the step, the fold and PEFT's file format are
:mod:`research.lowrank.lycoris`'s.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from research.lowrank.lycoris import Lycoris, Target
from research.methods import register

W1, W1A, W1B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
W2, W2A, W2B = "lokr_w2", "lokr_w2_a", "lokr_w2_b"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of ``dimension`` into ``(m, n)``, ``m·n = dimension``: ``(factor,
    dimension // factor)`` when ``factor`` divides it; otherwise the divisor pair nearest the
    square root whose smaller side stays within ``factor`` (-1: no bound), smaller first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        divisor = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if divisor > bound:
            break
        m, n = divisor, dimension // divisor
    return min(m, n), max(m, n)


@register("lokr")
@dataclasses.dataclass(frozen=True)
class LoKr(Lycoris):
    """LoKr options: :class:`~research.lowrank.lycoris.Lycoris`'s plus PEFT's

    decompose_both: also write ``W1`` as a rank-``r`` product when ``r`` is under half its
        larger side.
    decompose_factor: the size of ``W1``'s sides when it divides them (-1: near the square
        root of ``out`` and ``in``).
    """

    decompose_both: bool = False
    decompose_factor: int = -1

    title = "LoKr"
    peft_type = "LOKR"
    factor_names = (W1, W1A, W1B, W2, W2A, W2B)
    named_inits = ("lycoris",)

    def __post_init__(self):
        super().__post_init__()
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (
                factor == -1 or factor >= 1):
            raise ValueError(f"config.method.decompose_factor={factor!r} is neither -1 (near "
                             f"the square root) nor an integer >= 1")

    def factor_shapes(self, target: Target) -> dict[str, tuple]:
        r = target.rank
        a, b = factorization(target.fan_out, self.decompose_factor)
        c, d = factorization(target.fan_in, self.decompose_factor)
        if self.decompose_both and r < max(a, c) / 2:
            shapes = {W1A: (a, r), W1B: (r, c)}
        else:
            shapes = {W1: (a, c)}
        if r < max(b, d) / 2:
            return {**shapes, W2A: (b, r), W2B: (r, d)}
        return {**shapes, W2: (b, d)}

    def zero_factors(self) -> set[str]:
        if self.init_weights == "lycoris":
            return {W2, W2B}
        return {W1, W1A} if self.init_weights else set()

    def delta_weight(self, factors: dict, scale: float):
        w1 = factors[W1] if W1 in factors else factors[W1A] @ factors[W1B]
        w2 = factors[W2] if W2 in factors else factors[W2A] @ factors[W2B]
        return jnp.kron(w1, w2) * scale

    def peft_options(self) -> dict:
        return {"decompose_both": bool(self.decompose_both),
                "decompose_factor": int(self.decompose_factor), "rank_dropout_scale": False}

    @classmethod
    def options_from_peft(cls, config: dict) -> dict:
        return {"decompose_both": bool(config.get("decompose_both", False)),
                "decompose_factor": config.get("decompose_factor", -1)}
