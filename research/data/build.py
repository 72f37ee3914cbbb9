"""Build-on-first-use of the catalog's TFDS datasets, safe across processes.

Datasets live in a data folder: the ``data_dir`` argument, else ``$SCION_DATA_DIR``,
else ``~/.cache/scion/data``. The first use builds a dataset with TFDS into
array_record files (no TensorFlow involved). TFDS itself generates into a temporary
``incomplete.*`` folder and renames it into place when complete, so a reader never
sees half a dataset; on top of that an exclusive ``fcntl`` lock per dataset makes a
second process wait for the first one's build and then reuse it instead of racing
it (TFDS would refuse to rename over the finished folder).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
from typing import Any, NamedTuple

import tensorflow_datasets as tfds

from research.data.catalog import check_split, lookup
from research.data.sources import source_path

DEFAULT_DATA_DIR = "~/.cache/scion/data"


class DataInfo(NamedTuple):
    name: str
    split: str
    num_examples: int
    num_classes: int | None
    features: tfds.features.FeaturesDict


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    return pathlib.Path(data_dir or os.environ.get("SCION_DATA_DIR") or DEFAULT_DATA_DIR
                        ).expanduser()


@contextlib.contextmanager
def file_lock(path: pathlib.Path):
    """Hold an exclusive advisory lock on ``path`` (released by the OS if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dataset_lock(name: str, data_dir=None):
    """The lock guarding everything built for dataset ``name`` (all its configs) in a folder."""
    root = resolve_data_dir(data_dir)
    return file_lock(root / f".{lookup(name).builder.name}.lock")


def prepared_builder(name: str, data_dir=None) -> tfds.core.DatasetBuilder:
    """The TFDS builder for ``name``, building its files first if they are not there yet."""
    entry = lookup(name)

    def make():
        return entry.builder(config=entry.config, data_dir=str(resolve_data_dir(data_dir)),
                             file_format="array_record")

    builder = make()
    if builder.is_prepared():
        return builder
    source_path(entry.builder.SOURCE)  # fail with an install hint before TFDS starts
    with dataset_lock(name, data_dir):
        # Rebuilt under the lock: a builder made before another process finished would
        # not see the splits it wrote.
        builder = make()
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def data_source(name: str, split: str, data_dir=None) -> tuple[Any, DataInfo]:
    """A random-access source of decoded examples (dicts of numpy values) and its info."""
    check_split(split)
    builder = prepared_builder(name, data_dir)
    info = DataInfo(name=name, split=split,
                    num_examples=builder.info.splits[split].num_examples,
                    num_classes=lookup(name).num_classes, features=builder.info.features)
    return builder.as_data_source(split), info


def num_examples(name: str, split: str, data_dir=None) -> int:
    check_split(split)
    return prepared_builder(name, data_dir).info.splits[split].num_examples


def num_classes(name: str) -> int | None:
    """Number of label classes (``None`` for the language-modelling dataset)."""
    return lookup(name).num_classes
