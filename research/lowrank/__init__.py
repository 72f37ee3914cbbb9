"""Low-rank updates: factor trees beside chosen kernels (LoRA and its descendants), and their
interop with the PEFT adapter format."""

from research.lowrank.lora import LoRA, factor_pairs, lora_factors, merge, unmerge

__all__ = ["LoRA", "factor_pairs", "lora_factors", "merge", "unmerge"]
