"""The dataset catalog: public names mapped to TFDS builders and what a loader needs.

A name is ``builder`` or ``builder/config``. ``kind`` picks the loader's transform:
``image`` (scale pixels to [0, 1]), ``text`` (WordPiece-tokenise for
classification), ``lm`` (fixed windows of a token stream) or ``sft`` (those windows split
into a prompt and the target the loss scores, for supervised fine-tuning).
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow_datasets as tfds

from research.data.images import Digits, Mnist5k
from research.data.rotten_tomatoes import RottenTomatoes
from research.data.shakespeare import Shakespeare
from research.data.splits import SPLITS


class Entry(NamedTuple):
    description: str
    builder: type[tfds.core.GeneratorBasedBuilder]
    config: str | None
    kind: str
    num_classes: int | None


CATALOG = {
    "digits": Entry("sklearn 8x8 digits, 10 classes", Digits, None, "image", 10),
    "mnist5k": Entry("5000 MNIST 28x28 digits, 10 classes", Mnist5k, None, "image", 10),
    "rotten_tomatoes/sentiment": Entry("review sentiment: fresh=1, rotten=0",
                                       RottenTomatoes, "sentiment", "text", 2),
    "rotten_tomatoes/subjectivity": Entry("plot=0 vs review=1, balanced",
                                          RottenTomatoes, "subjectivity", "text", 2),
    "shakespeare": Entry("Shakespeare's plays as text, split by play (language modelling)",
                         Shakespeare, None, "lm", None),
    "shakespeare/sft": Entry("Shakespeare windows as prompt -> continuation pairs "
                             "(supervised fine-tuning)", Shakespeare, None, "sft", None),
}

DATASETS = {name: entry.description for name, entry in CATALOG.items()}


def lookup(name: str) -> Entry:
    if name not in CATALOG:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(CATALOG)}")
    return CATALOG[name]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split
