"""Masked Thought: only target-span inputs are ever replaced, at about the rate, with labels and
prompt untouched; masks are fixed per record and epoch and differ across epochs; the causal LM
loss weighs the target only; the config's evaluation stream is clean; rate 0 is the identity;
a rate outside [0, 1) is a one-line error naming the config key."""

import jax
import numpy as np
import pytest

from configs import llama_masked_thought
from research import data, models
from research.data import lm, masked_thought
from research.train import loop, tasks

LENGTH, PROMPT = 64, 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def first_batches(data_dir, count=1, **options):
    options = {"batch_size": 16, "max_length": LENGTH, "prompt_length": PROMPT,
               "tokenizer": "char", "shard_index": 0, "shard_count": 1, "prefetch": 0,
               "data_dir": data_dir, **options}
    loader = iter(data.make_loader("shakespeare/sft", "train", **options))
    return [next(loader) for _ in range(count)]


def test_mask_target_touches_only_the_target_at_the_rate():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 256, (64, 128)).astype(np.int32)
    target = (np.arange(128) >= 40).astype(np.int32)[None].repeat(64, 0)
    masked = masked_thought.mask_target(ids, target, 0.3, 0, np.random.default_rng(1))
    changed = masked != ids
    assert masked.dtype == ids.dtype and not changed[:, :40].any()
    assert (masked[changed] == 0).all()
    assert abs(changed[:, 40:].mean() - 0.3) < 0.02
    same = masked_thought.mask_target(ids, target, 0.0, 0, np.random.default_rng(1))
    np.testing.assert_array_equal(same, ids)


def test_training_stream_masks_the_target_inputs_only(data_dir):
    clean, = first_batches(data_dir)
    masked, = first_batches(data_dir, mask_rate=0.25)
    again, = first_batches(data_dir, mask_rate=0.25)
    for key in ("labels", "attention_mask", "target_mask"):
        np.testing.assert_array_equal(masked[key], clean[key])
    np.testing.assert_array_equal(clean["labels"], clean["input_ids"])
    np.testing.assert_array_equal(masked["input_ids"], again["input_ids"])  # deterministic
    assert (masked["target_mask"] == (np.arange(LENGTH) >= PROMPT)).all()
    changed = masked["input_ids"] != clean["input_ids"]
    assert not changed[:, :PROMPT].any() and (masked["input_ids"][changed] == 0).all()
    assert abs(changed[:, PROMPT:].mean() - 0.25) < 0.04
    rate_zero, = first_batches(data_dir, mask_rate=0.0)
    jax.tree.map(np.testing.assert_array_equal, rate_zero, clean)


def test_each_epoch_draws_new_masks_for_the_same_records(data_dir):
    # A shard of a few records, read whole twice in order: the same windows, other masks.
    windows = len(lm.Windows(lm.stream_file("shakespeare/sft", "train", "char", data_dir=data_dir),
                             LENGTH))
    shards = windows // 4
    first, second = first_batches(data_dir, count=2, batch_size=windows // shards,
                                  shard_count=shards, shuffle=False, num_epochs=2, mask_rate=0.5)
    np.testing.assert_array_equal(first["labels"], second["labels"])
    assert not np.array_equal(first["input_ids"], second["input_ids"])


def test_loss_counts_the_target_span_only(data_dir):
    batch, = first_batches(data_dir, batch_size=4, mask_rate=0.25)
    model = models.build("llama_tiny_lm")
    inputs, targets = tasks.model_inputs(model, batch, None, training=True)
    np.testing.assert_array_equal(inputs["input_ids"], batch["input_ids"])
    np.testing.assert_array_equal(targets["label"], batch["labels"][:, 1:])
    np.testing.assert_array_equal(targets["weight"], batch["target_mask"][:, 1:])
    logits = np.random.default_rng(0).normal(size=(4, LENGTH, 256)).astype(np.float32)
    other = logits.copy()
    other[:, :PROMPT - 1] += np.random.default_rng(1).normal(0.0, 5.0, (4, PROMPT - 1, 256))
    sums = tasks.loss_sums(model, logits, targets)
    assert float(sums["count"]) == 4 * (LENGTH - PROMPT)
    assert float(sums["loss"]) == pytest.approx(float(tasks.loss_sums(model, other, targets)["loss"]))


def test_config_masks_training_and_evaluates_clean(data_dir):
    config = llama_masked_thought.get_config("quick")
    config.data.data_dir = data_dir
    assert config.data.train_options.mask_rate > 0
    evaluation = next(iter(loop.make_loader(config, "validation", training=False, batch_size=8)))
    np.testing.assert_array_equal(evaluation["input_ids"], evaluation["labels"])
    training = next(iter(loop.make_loader(config, "train", training=True, batch_size=8)))
    assert (training["input_ids"] != training["labels"]).any()


@pytest.mark.parametrize("options, message", [
    (dict(mask_rate=1.0), "mask_rate=1.0 (config.data.train_options.mask_rate) is not in [0, 1)"),
    (dict(mask_rate=-0.1), "mask_rate=-0.1 (config.data.train_options.mask_rate)"),
    (dict(prompt_length=LENGTH), f"prompt_length={LENGTH} (config.data.options.prompt_length)"),
])
def test_bad_options_are_one_line_errors(data_dir, options, message):
    with pytest.raises(ValueError) as err:
        first_batches(data_dir, **options)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="applies to 'sft' datasets; 'shakespeare' is 'lm'"):
        data.make_loader("shakespeare", "train", batch_size=2, mask_rate=0.2, data_dir=data_dir,
                         tokenizer="char")
