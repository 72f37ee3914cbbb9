"""Masked Thought (Chen et al., 2024, "Masked Thought: Simply Masking Partial Reasoning Steps
Can Improve Mathematical Reasoning Learning of Language Models"): in supervised fine-tuning,
replace a random share ``p`` of the *input* tokens inside the target span (the chain of
thought) by a mask token, keep the labels clean and score the target only. Each next token
must then be predicted with some of the preceding steps hidden, which pushes the model to
lean on the prompt and on the steps it can still see: a regulariser by input noise.

Here a grain transform over SFT examples (``input_ids``, ``labels``, ``target_mask``) that
rewrites ``input_ids`` only. It runs in the training stream alone
(``config.data.train_options.mask_rate``); evaluation sees clean inputs.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from research.data.tokenize import wordpiece

RATE_KEY = "config.data.train_options.mask_rate"
# The paper masks with a token the text never contains ([MASK] / unk). Char streams are UTF-8
# bytes of plain text, which has no NUL byte; WordPiece has [MASK].
CHAR_MASK_ID = 0


def default_mask_id(tokenizer: str, vocab_path: str) -> int:
    return CHAR_MASK_ID if tokenizer == "char" else wordpiece(vocab_path).token_to_id("[MASK]")


def check_rate(rate: float) -> float:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"mask_rate={rate!r} ({RATE_KEY}) is not in [0, 1)")
    return rate


def mask_target(input_ids: np.ndarray, target_mask: np.ndarray, rate: float, mask_id: int,
                rng: np.random.Generator) -> np.ndarray:
    """``input_ids`` with each target position (``target_mask`` 1) replaced by ``mask_id``
    with probability ``rate``; prompt positions are never touched."""
    picked = target_mask.astype(bool) & (rng.random(input_ids.shape) < check_rate(rate))
    return np.where(picked, mask_id, input_ids).astype(input_ids.dtype)


@dataclasses.dataclass(frozen=True)
class MaskTarget(grain.transforms.RandomMap):
    """Masked Thought on one SFT example. grain hands each record a generator seeded by the
    loader's seed plus the record's global index (epoch x records + position in the shuffled
    order), so an example's mask is fixed for a given epoch, differs between epochs, and a
    resumed iterator replays it exactly."""

    rate: float
    mask_id: int

    def __post_init__(self):
        check_rate(self.rate)

    def random_map(self, example, rng):
        return {**example, "input_ids": mask_target(example["input_ids"], example["target_mask"],
                                                    self.rate, self.mask_id, rng)}
