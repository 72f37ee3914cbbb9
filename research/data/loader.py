"""grain loaders over the built datasets: deterministic, shardable, checkpointable batches.

A ``grain.DataLoader`` reads a random-access source through an ``IndexSampler``
(this process's shard, shuffled by the seed and re-shuffled every epoch), maps
each example to model inputs and batches them into dicts of numpy arrays:

* images — ``image`` float32 [B, H, W, 1] in [0, 1], ``label`` int32 [B];
* text   — ``input_ids``, ``attention_mask``, ``token_type_ids`` int32 [B, L],
  ``label`` int32 [B];
* lm     — ``input_ids`` int32 [B, L] and ``attention_mask`` (all ones), windows of
  the split's token stream (see ``research.data.lm``);
* sft    — the same windows as prompt -> target pairs: also ``labels`` (the clean
  tokens) and ``target_mask`` (1 from ``prompt_length`` on, where the loss counts);
  training streams may apply Masked Thought to ``input_ids`` (``mask_rate``, see
  ``research.data.masked_thought``).

The loader's iterator has ``get_state()`` / ``set_state()`` so training can resume
at the exact next batch. Shards are contiguous, equal-sized slices of the split (a
remainder of fewer than ``shard_count`` examples is skipped, as grain does); TFDS
stores examples in a hashed order, so a contiguous slice is still a random subset.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from absl import flags

from research.data.build import data_source
from research.data.catalog import check_split, lookup
from research.data.lm import Windows, stream_file
from research.data.masked_thought import MaskTarget, check_rate, default_mask_id
from research.data.tokenize import default_vocab_path, encode


@dataclasses.dataclass(frozen=True)
class ScaleImage(grain.transforms.Map):
    """uint8 pixels -> float32 in [0, 1] (divided by the dataset's maximum pixel value)."""

    max_value: int

    def map(self, example):
        return {"image": example["image"].astype(np.float32) / self.max_value,
                "label": np.int32(example["label"])}


@dataclasses.dataclass(frozen=True)
class TokenizeText(grain.transforms.Map):
    """Text -> padded WordPiece inputs (the tokenizer is cached per process)."""

    max_length: int
    vocab_path: str

    def map(self, example):
        inputs = encode(example["text"].decode(), self.max_length, self.vocab_path)
        return {**inputs, "label": np.int32(example["label"])}


class WindowInputs(grain.transforms.Map):
    """A token window -> causal LM inputs; every position is real text, so the mask is ones."""

    def map(self, window):
        return {"input_ids": window, "attention_mask": np.ones_like(window)}


@dataclasses.dataclass(frozen=True)
class WindowPromptTarget(grain.transforms.Map):
    """A token window -> an SFT example: its first ``prompt_length`` tokens are the prompt,
    the rest the target the loss scores."""

    prompt_length: int

    def map(self, window):
        target = (np.arange(len(window)) >= self.prompt_length).astype(np.int32)
        return {"input_ids": window, "labels": window, "attention_mask": np.ones_like(window),
                "target_mask": target}


def _sft_operations(max_length, prompt_length, mask_rate, mask_id, tokenizer, vocab_path):
    prompt_length = max_length // 2 if prompt_length is None else prompt_length
    if not 0 < prompt_length < max_length:
        raise ValueError(f"prompt_length={prompt_length} (config.data.options.prompt_length) "
                         f"is not in (0, max_length={max_length})")
    operations = [WindowPromptTarget(prompt_length)]
    if mask_rate:
        mask_id = (default_mask_id(tokenizer, vocab_path or default_vocab_path())
                   if mask_id is None else mask_id)
        operations.append(MaskTarget(mask_rate, mask_id))
    return operations


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # only needed for the default, and slow to import

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    return shard_index, shard_count


def make_loader(name: str, split: str, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None, shard_index: int | None = None,
                shard_count: int | None = None, max_length: int = 64,
                vocab_path: str | None = None, tokenizer: str = "wordpiece",
                drop_remainder: bool = True, worker_count: int = 0, prefetch: int = 64,
                data_dir=None, prompt_length: int | None = None, mask_rate: float = 0.0,
                mask_id: int | None = None) -> grain.DataLoader:
    """A loader of ``name``'s ``split`` (built on first use).

    ``num_epochs=None`` repeats forever; shards default to this JAX process among all
    of them. ``max_length`` is the token length for text and the window length for
    ``lm`` datasets, whose ``tokenizer`` is ``'wordpiece'`` or ``'char'``. ``prefetch``
    is grain's read-ahead buffer (0 reads synchronously); ``worker_count > 0`` maps in
    that many child processes. grain deals records out to workers, so batch order
    depends on ``worker_count`` and a saved iterator state restores only with the same.
    ``sft`` datasets split each window at ``prompt_length`` (default half of it) and, with
    ``mask_rate > 0``, replace that share of the target's input tokens by ``mask_id``
    (default: the tokenizer's, see ``research.data.masked_thought``).
    """
    entry = lookup(name)
    check_split(split)
    if check_rate(mask_rate) and entry.kind != "sft":
        raise ValueError(f"mask_rate={mask_rate} applies to 'sft' datasets; {name!r} is "
                         f"{entry.kind!r}")
    if entry.kind in ("lm", "sft"):
        source = Windows(stream_file(name, split, tokenizer, vocab_path, data_dir), max_length)
        operations = ([WindowInputs()] if entry.kind == "lm" else _sft_operations(
            max_length, prompt_length, mask_rate, mask_id, tokenizer, vocab_path))
    else:
        source, _ = data_source(name, split, data_dir)
        operations = [ScaleImage(entry.builder.MAX_VALUE) if entry.kind == "image"
                      else TokenizeText(max_length, vocab_path or default_vocab_path())]
    shard_index, shard_count = _shard(shard_index, shard_count)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True),
        shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    if worker_count and not flags.FLAGS.is_parsed():
        # grain's worker pool reads its absl flags; outside absl.app.run nothing has
        # parsed them, which would fail, so take their defaults.
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[*operations, grain.transforms.Batch(batch_size, drop_remainder=drop_remainder)],
        worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=min(prefetch, 8), prefetch_buffer_size=prefetch))
