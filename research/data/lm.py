"""Language-modelling windows: a split's passages as one token stream cut into fixed windows.

grain wants a random-access source of fixed length, so rather than packing passages
on the fly, each split's token stream is computed once — every passage tokenised and
followed by a separator, in the source's fixed (TFDS-hashed) order — saved as
``<data_dir>/<dataset>_streams/<version>/<split>-<tokenizer>.npy`` and memory-mapped. Window ``i`` is tokens ``[i*L, (i+1)*L)`` (the last partial
window is dropped); models shift it by one position for next-token targets.

Tokenisers: ``wordpiece`` (MiniLM vocabulary, ``[SEP]`` after each passage) and
``char`` (UTF-8 bytes, vocabulary 256, a blank line after each passage).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import pathlib

import numpy as np

from research.data.build import dataset_lock, prepared_builder, resolve_data_dir
from research.data.tokenize import default_vocab_path, wordpiece, wordpiece_ids

TOKENIZERS = ("wordpiece", "char")


def passage_stream(texts: list[str], tokenizer: str, vocab_path: str) -> np.ndarray:
    """All passages as one int32 token stream, each followed by a separator."""
    if tokenizer == "char":
        return np.frombuffer("".join(t + "\n\n" for t in texts).encode(), np.uint8).astype(np.int32)
    separator = wordpiece(vocab_path).token_to_id("[SEP]")
    ids = wordpiece_ids(texts, vocab_path)
    return np.fromiter(itertools.chain.from_iterable(i + [separator] for i in ids), np.int32)


def stream_file(name: str, split: str, tokenizer: str, vocab_path: str | None = None,
                data_dir=None) -> pathlib.Path:
    """The cached token stream of ``name``'s ``split``, computed under the dataset lock."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; "
                         f"valid tokenizers: {', '.join(TOKENIZERS)}")
    builder = prepared_builder(name, data_dir)
    vocab_path = vocab_path or default_vocab_path()
    # The vocabulary's content, not its path, decides the ids, so it names the file.
    tag = ("char" if tokenizer == "char" else
           "wordpiece-" + hashlib.sha1(pathlib.Path(vocab_path).read_bytes()).hexdigest()[:12])
    path = (resolve_data_dir(data_dir) / f"{builder.name}_streams" / str(builder.version)
            / f"{split}-{tag}.npy")
    if path.exists():
        return path
    with dataset_lock(name, data_dir):
        if not path.exists():
            source = builder.as_data_source(split)
            texts = [source[i]["text"].decode() for i in range(len(source))]
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write aside and rename, so a reader never maps a half-written file.
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            with open(partial, "wb") as handle:
                np.save(handle, passage_stream(texts, tokenizer, vocab_path))
            os.replace(partial, path)
    return path


class Windows:
    """Random-access source of non-overlapping int32 windows of a saved token stream."""

    def __init__(self, path: str | os.PathLike, length: int):
        self.path, self.length = str(path), length
        self._count = len(np.load(self.path, mmap_mode="r")) // length

    @functools.cached_property
    def _stream(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def __getstate__(self):
        # Workers re-open the memory map instead of receiving a pickled copy of it.
        return {"path": self.path, "length": self.length, "_count": self._count}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._count:
            raise IndexError(f"window {index} out of range [0, {self._count})")
        start = index * self.length
        return np.asarray(self._stream[start:start + self.length], np.int32)

    def __repr__(self) -> str:
        # grain compares reprs when restoring a checkpoint: name the stream without the
        # data folder, so a checkpoint still restores after the folder moves.
        stream = "/".join(pathlib.Path(self.path).parts[-3:])
        return f"Windows({stream!r}, length={self.length})"
