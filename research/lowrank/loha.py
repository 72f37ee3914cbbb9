"""LoHa (Hyeon-Woo et al., 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning"), as the LyCORIS tuner PEFT ships: freeze ``W`` and learn
``ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha / r``. Two rank-``r`` matrices multiplied elementwise reach
rank ``r²`` for the parameters of a rank-``2r`` LoRA.

As PEFT 0.21 does it: ``hada_w1_a``, ``hada_w2_a`` are ``[out, r]`` and ``hada_w1_b``,
``hada_w2_b`` ``[r, in]`` in torch's frame of the layer; the three first start
``kaiming_uniform`` and ``hada_w2_b`` at zero, so ``ΔW = 0`` and the model is unchanged at step
0. Planning, the step, the fold and PEFT's file format are :mod:`research.lowrank.lycoris`'s.
"""

from __future__ import annotations

import dataclasses

from research.lowrank.lycoris import Lycoris, Target
from research.methods import register

W1A, W1B, W2A, W2B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"


@register("loha")
@dataclasses.dataclass(frozen=True)
class LoHa(Lycoris):
    """LoHa options: :class:`~research.lowrank.lycoris.Lycoris`'s
    (``config.method = dict(name='loha', targets=((regex, rank),), alpha=...)``)."""

    title = "LoHa"
    peft_type = "LOHA"
    factor_names = (W1A, W1B, W2A, W2B)

    def factor_shapes(self, target: Target) -> dict[str, tuple]:
        r, out, in_ = target.rank, target.fan_out, target.fan_in
        return {W1A: (out, r), W1B: (r, in_), W2A: (out, r), W2B: (r, in_)}

    def zero_factors(self) -> set[str]:
        return {W2B} if self.init_weights else set()

    def delta_weight(self, factors: dict, scale: float):
        return (factors[W1A] @ factors[W1B]) * (factors[W2A] @ factors[W2B]) * scale
