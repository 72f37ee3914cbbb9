"""Offline datasets as TFDS array_record builds, read with grain.

Raw data ships inside installed packages (``sources``); each dataset is a TFDS
builder (``images``, ``rotten_tomatoes``, ``shakespeare``) built on first use into
the data folder under a file lock (``build``); ``make_loader`` turns a split into
deterministic, shardable, checkpointable grain batches (``loader``).

    from research import data
    loader = data.make_loader("rotten_tomatoes/sentiment", "train", batch_size=32)
    batch = next(iter(loader))  # input_ids, attention_mask, token_type_ids, label
"""

from research.data.build import data_source, num_classes, num_examples
from research.data.catalog import DATASETS
from research.data.loader import make_loader

__all__ = ["DATASETS", "data_source", "make_loader", "num_classes", "num_examples"]
