"""Low-rank updates: factor trees beside chosen kernels (LoRA and its descendants), and their
interop with the PEFT adapter format."""

from research.lowrank.dora import DoRA
from research.lowrank.lora import (LoRA, factor_pairs, lora_factors, merge, to_plain_lora,
                                   unmerge)

__all__ = ["DoRA", "LoRA", "factor_pairs", "lora_factors", "merge", "to_plain_lora", "unmerge"]
