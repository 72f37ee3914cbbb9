"""grain loaders over the built datasets: deterministic, shardable, checkpointable batches.

A ``grain.DataLoader`` reads a random-access source through :class:`GlobalBatches`
(a seeded order, re-shuffled every epoch, cut into global batches of which each JAX
process reads its own rows), maps each example to model inputs and batches them
into dicts of numpy arrays:

* images — ``image`` float32 [B, H, W, 1] in [0, 1], ``label`` int32 [B];
* text   — ``input_ids``, ``attention_mask``, ``token_type_ids`` int32 [B, L],
  ``label`` int32 [B];
* lm     — ``input_ids`` int32 [B, L] and ``attention_mask`` (all ones), windows of
  the split's token stream (see ``research.data.lm``);
* sft    — the same windows as prompt -> target pairs: also ``labels`` (the clean
  tokens) and ``target_mask`` (1 from ``prompt_length`` on, where the loss counts);
  training streams may apply Masked Thought to ``input_ids`` (``mask_rate``, see
  ``research.data.masked_thought``).

A stream is a pure function of its options and ``start_batch``: training resumes
on any number of processes by starting at the number of batches already consumed
(grain's ``get_state()`` / ``set_state()`` also work, on the same topology).
"""

from __future__ import annotations

import dataclasses
import sys

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


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only needed for the default, and slow to import

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    return process_index, process_count


class GlobalBatches:
    """A grain sampler dealing global batches out to processes.

    Position ``j`` of the global stream is record ``order[j]`` of the (optionally shuffled,
    reshuffled every epoch) order; global batch ``b`` holds positions ``[b·B, (b+1)·B)``, and
    process ``p`` of ``P`` reads its contiguous block of ``B/P`` rows of every one. So the global
    batches, and each record's random stream (seeded by its global position), are the same on
    one process or many, and a run restarted at batch ``start_batch`` on another topology reads
    exactly what the original would have. With ``pad_remainder`` a finite stream's last global
    batch is filled up from its start; :meth:`Loader.valid` says which rows are real.
    """

    def __init__(self, records: range, batch_size: int, process: tuple[int, int], *,
                 shuffle: bool, seed: int, num_epochs: int | None, start_batch: int,
                 drop_remainder: bool, pad_remainder: bool):
        process_index, process_count = process
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} does not divide over {process_count} "
                             "processes")
        self.records, self.batch_size, self.start_batch = records, batch_size, start_batch
        self.rows = batch_size // process_count
        self.first_row = process_index * self.rows
        self.total = None if num_epochs is None else num_epochs * len(records)
        self._order = grain.samplers.IndexSampler(len(records), shuffle=shuffle, seed=seed)
        self._length = sys.maxsize
        if self.total is not None:
            full, remainder = divmod(self.total, batch_size)
            last = 0 if drop_remainder or start_batch > full else (
                self.rows if pad_remainder and remainder else
                min(max(remainder - self.first_row, 0), self.rows))
            self._length = max(full - start_batch, 0) * self.rows + last

    def __len__(self) -> int:
        return self._length

    def position(self, index: int) -> int:
        """The global stream position of this process's ``index``-th record."""
        batch, row = divmod(index, self.rows)
        return (self.start_batch + batch) * self.batch_size + self.first_row + row

    def _drawn(self, position: int) -> grain.RecordMetadata:
        """The order's entry at a global position (a padded stream wraps to its start)."""
        return self._order[position % self.total if self.total else position]

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._length:
            raise IndexError(f"record {index} is past the end ({self._length}) of the stream")
        position = self.position(index)
        drawn = self._drawn(position)
        return grain.RecordMetadata(index=position, rng=drawn.rng,
                                    record_key=self.records[drawn.record_key])

    def batch_records(self, batch: int) -> list[int]:
        """The record indices of global batch ``batch``, every process's rows."""
        return [self.records[self._drawn(position).record_key]
                for position in range(batch * self.batch_size, (batch + 1) * self.batch_size)]

    def __repr__(self) -> str:
        return (f"GlobalBatches(records={self.records}, batch_size={self.batch_size}, "
                f"rows={self.first_row}:{self.first_row + self.rows}, "
                f"start_batch={self.start_batch}, order={self._order!r})")


@dataclasses.dataclass(frozen=True)
class Loader:
    """A grain ``DataLoader`` over :class:`GlobalBatches`; iterate it for this process's rows."""

    loader: grain.DataLoader
    sampler: GlobalBatches

    def __iter__(self):
        return iter(self.loader)

    def valid(self, batch: int) -> np.ndarray:
        """int32 [rows]: 1 where row of this process's ``batch``-th batch is a real record, 0
        where it pads the stream's last global batch."""
        positions = self.sampler.position(batch * self.sampler.rows) + np.arange(self.sampler.rows)
        total = self.sampler.total
        return (positions < (total if total is not None else np.inf)).astype(np.int32)


def make_loader(name: str, split: str, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                process_index: int | None = None, process_count: int | None = None,
                start_batch: int = 0, max_length: int = 64, vocab_path: str | None = None,
                tokenizer: str = "wordpiece", drop_remainder: bool = True,
                pad_remainder: bool = False, worker_count: int = 0, prefetch: int = 64,
                data_dir=None, prompt_length: int | None = None, mask_rate: float = 0.0,
                mask_id: int | None = None) -> Loader:
    """A loader of ``name``'s ``split`` (built on first use), in global batches of
    ``batch_size`` of which this process reads its rows (see :class:`GlobalBatches`).

    ``num_epochs=None`` repeats forever; ``start_batch`` skips that many global batches (a
    resumed run starts where it stopped). ``shard_index`` of ``shard_count`` restricts the
    split to one contiguous slice of its records (soup ingredients train on disjoint ones);
    TFDS stores examples in a hashed order, so a slice is still a random subset. Processes
    default to this JAX process among all of them. The last partial global batch of a finite
    stream is dropped (``drop_remainder``), kept short, or padded (``pad_remainder``).
    ``max_length`` is the token length for text and the window length for ``lm`` datasets,
    whose ``tokenizer`` is ``'wordpiece'`` or ``'char'``. ``prefetch`` is grain's read-ahead
    buffer (0 reads synchronously); ``worker_count > 0`` maps in that many child processes.
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
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    per_shard = len(source) // shard_count
    sampler = GlobalBatches(
        range(shard_index * per_shard, (shard_index + 1) * per_shard), batch_size,
        _process(process_index, process_count), shuffle=shuffle, seed=seed,
        num_epochs=num_epochs, start_batch=start_batch, drop_remainder=drop_remainder,
        pad_remainder=pad_remainder)
    if worker_count and not flags.FLAGS.is_parsed():
        # grain's worker pool reads its absl flags; outside absl.app.run nothing has
        # parsed them, which would fail, so take their defaults.
        flags.FLAGS.mark_as_parsed()
    return Loader(grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=grain.sharding.NoSharding(),
        operations=[*operations, grain.transforms.Batch(sampler.rows, drop_remainder=False)],
        worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=min(prefetch, 8),
                                       prefetch_buffer_size=prefetch)), sampler)
