"""Base TFDS builder for datasets whose raw data ships inside an installed package.

Nothing is downloaded: ``_split_generators`` reads ``source_path(SOURCE)`` directly.
"""

from __future__ import annotations

import tensorflow_datasets as tfds


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder reading ``research.data.sources.SOURCES[SOURCE]``; not registered with TFDS."""

    SOURCE = ""
    # TFDS looks next to the builder's module for a checksums file of downloads. There
    # are none, and locating the module needs the `importlib_resources` backport, which
    # is not installed, so opt out of the lookup.
    code_path = None
