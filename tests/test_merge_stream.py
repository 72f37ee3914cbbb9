"""Out-of-core checkpoints: tensors stream through ``Checkpoint``/``CheckpointWriter`` bit-exactly
(every dtype, single and sharded, loadable by safetensors and ``transformers``); reading N models
tensor by tensor keeps peak RSS within (N + 2) x the largest tensor however large the models;
a killed or failed write never leaves a checkpoint that loads; pickles are never opened."""

import functools
import glob
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from research.merge import stream  # noqa: E402
from research.merge.stream import Checkpoint, CheckpointWriter, read_ahead  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_rng = np.random.default_rng(0)
NUMPY_TENSORS = {
    "embed/table": _rng.normal(size=(7, 5)).astype(np.float32),
    "layer_0/kernel": _rng.normal(size=(5, 3, 2)).astype(np.float16),
    "layer_0/scale": np.array(1.5),  # 0-d float64
    "empty": np.zeros((0, 4), np.float32),
    "ids": _rng.integers(-2**40, 2**40, size=(6,)),
    "i32": _rng.integers(-9, 9, size=(2, 3), dtype=np.int32),
    "i16": _rng.integers(-9, 9, size=(5,), dtype=np.int16),
    "i8": _rng.integers(-9, 9, size=(3,), dtype=np.int8),
    "u8": _rng.integers(0, 255, size=(9,), dtype=np.uint8),
    "mask": _rng.random((4, 2)) > 0.5,
}
TENSORS = {
    **NUMPY_TENSORS,
    "layer_1/kernel": _rng.normal(size=(3, 4)).astype(ml_dtypes.bfloat16),
    "fp8": _rng.normal(size=(8,)).astype(ml_dtypes.float8_e4m3fn),
}


def _specs(tensors):
    return [(name, value.shape, value.dtype) for name, value in tensors.items()]


def _write(directory, tensors, **kwargs):
    with CheckpointWriter(str(directory), _specs(tensors), **kwargs) as writer:
        for name, value in tensors.items():
            writer.write(name, value)
        writer.commit({"config.json": {"model_type": "toy"}})


def _assert_same(a, b, name=""):
    assert (a.shape, a.dtype, a.tobytes()) == (b.shape, b.dtype, b.tobytes()), name


def _read_all(directory):
    with Checkpoint(str(directory)) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.names}


def _siblings(path):
    """Hidden staging / old directories left next to ``path``."""
    parent, name = os.path.split(str(path))
    return [f for f in os.listdir(parent) if f.startswith(f".{name}.")]


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64], ids=["single", "sharded"])
def test_round_trip_every_dtype(tmp_path, max_shard_bytes):
    out = tmp_path / "out"
    _write(out, TENSORS, max_shard_bytes=max_shard_bytes, metadata={"merged_by": "scion"})
    files = sorted(os.listdir(out))
    if max_shard_bytes == 64:
        with open(out / stream.INDEX_FILE) as file:
            index = json.load(file)
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and files == sorted([*shards, stream.INDEX_FILE, "config.json"])
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in TENSORS.values())
        # Planned packing: a shard never passes the limit unless one tensor alone does.
        for shard in shards:
            sizes = [TENSORS[n].nbytes for n, s in index["weight_map"].items() if s == shard]
            assert sum(sizes) <= 64 or len(sizes) == 1
    else:
        assert files == ["config.json", stream.WEIGHTS_FILE]

    with Checkpoint(str(out)) as checkpoint:
        assert checkpoint.names == list(TENSORS)  # written order is on-disk order
        assert checkpoint.config == {"model_type": "toy"}
        assert checkpoint.metadata == {"format": "pt", "merged_by": "scion"}
        assert checkpoint.specs() == [(n, v.shape, v.dtype) for n, v in TENSORS.items()]
        for name, value in TENSORS.items():
            _assert_same(checkpoint.read(name), value, name)
    # safetensors' own loader agrees, bf16 and fp8 included (numpy has no bf16: use torch).
    for path in glob.glob(str(out / "*.safetensors")):
        with safetensors.safe_open(path, "pt") as file:
            for name in file.keys():
                bits = file.get_tensor(name).reshape(-1).view(torch.uint8).numpy()
                assert bits.tobytes() == TENSORS[name].tobytes(), name


def test_interop_with_safetensors_numpy(tmp_path):
    """Files safetensors writes read back exactly, and ours load with its numpy loader."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    safetensors.numpy.save_file(NUMPY_TENSORS, str(theirs / stream.WEIGHTS_FILE))
    for name, value in _read_all(theirs).items():
        _assert_same(value, NUMPY_TENSORS[name], name)
    _write(tmp_path / "ours", NUMPY_TENSORS)
    loaded = safetensors.numpy.load_file(str(tmp_path / "ours" / stream.WEIGHTS_FILE))
    assert loaded.keys() == NUMPY_TENSORS.keys()
    for name, value in loaded.items():
        _assert_same(value, NUMPY_TENSORS[name], name)


def _tiny_model(family):
    """A random ``transformers`` model built locally (nothing is downloaded)."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=32)
    if family == "llama":
        config = transformers.LlamaConfig(**sizes, num_key_value_heads=1,
                                          tie_word_embeddings=False)
        return (transformers.LlamaForCausalLM(config).to(torch.bfloat16),
                transformers.AutoModelForCausalLM)
    return transformers.BertModel(transformers.BertConfig(**sizes)), transformers.AutoModel


@pytest.mark.parametrize("family,sharded", [("llama", True), ("bert", False)],
                         ids=["llama_bf16_sharded", "bert_f32_single"])
def test_transformers_checkpoint_round_trip(tmp_path, family, sharded):
    model, auto = _tiny_model(family)
    model.save_pretrained(str(tmp_path / "in"), max_shard_size="4KB" if sharded else "1GB")

    with Checkpoint(str(tmp_path / "in")) as checkpoint:
        assert checkpoint.config["model_type"] == family
        assert len(checkpoint.names) == len(model.state_dict())
        extra = {name: (tmp_path / "in" / name).read_bytes()
                 for name in os.listdir(tmp_path / "in")
                 if name.endswith(".json") and name != stream.INDEX_FILE}
        with CheckpointWriter(str(tmp_path / "out"), checkpoint.specs(),
                              max_shard_bytes=4096 if sharded else 10**9) as writer:
            for name in checkpoint.names:
                writer.write(name, checkpoint.read(name))
            writer.commit(extra)
    assert os.path.isfile(tmp_path / "out" / stream.INDEX_FILE) == sharded

    reloaded = auto.from_pretrained(str(tmp_path / "out"), dtype="auto")
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and torch.equal(actual[name], value), name


# ---------------------------------------------------------------------------------------------
# Bounded memory
# ---------------------------------------------------------------------------------------------

MODELS, TENSORS_PER_MODEL, SIDE = 3, 40, 1024  # 40 tensors of 4 MiB: 480 MiB read in all
# Fixed overhead beyond the tensors themselves: the worker thread's stack and the file buffers
# (well under 1 MiB measured) plus malloc slack. 8 MiB is 1/60 of the input: a reader that
# cached or mmapped even one checkpoint (160 MiB) fails by far.
OVERHEAD = 8 << 20
MERGE_SCRIPT = textwrap.dedent("""
    import functools, sys
    import numpy as np
    from research.merge.stream import Checkpoint, CheckpointWriter, read_ahead

    def status(field):
        with open("/proc/self/status") as file:
            return next(int(l.split()[1]) * 1024 for l in file if l.startswith(field + ":"))

    *inputs, out_dir, depth = sys.argv[1:]
    checkpoints = [Checkpoint(path) for path in inputs]
    names = checkpoints[0].names
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset VmHWM: measure the merge's peak, not the imports'
    start = status("VmRSS")
    reads = (functools.partial(c.read, name) for name in names for c in checkpoints)
    tensors_in = read_ahead(reads, int(depth)) if int(depth) else (read() for read in reads)
    with CheckpointWriter(out_dir, checkpoints[0].specs(), max_shard_bytes=64 << 20) as writer:
        for name in names:  # gather every model's tensor, then merge: as merge kernels do
            tensors = [next(tensors_in) for _ in checkpoints]
            merged = tensors[0].astype(np.float32)
            for tensor in tensors[1:]:
                merged += tensor
            merged /= len(tensors)
            writer.write(name, merged)
            del tensors, tensor, merged  # a live loop variable is one more tensor
        writer.commit()
    print(status("VmHWM") - start)
""")


@pytest.fixture(scope="module")
def big_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    paths = []
    for model in range(MODELS):
        specs = [(f"layer_{i}/kernel", (SIDE, SIDE), np.float32) for i in range(TENSORS_PER_MODEL)]
        with CheckpointWriter(str(root / f"m{model}"), specs, max_shard_bytes=50 << 20) as writer:
            for i, (name, shape, dtype) in enumerate(specs):
                writer.write(name, np.full(shape, model + i, dtype))
            writer.commit()
        paths.append(str(root / f"m{model}"))
    return paths


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("depth", [0, 1], ids=["plain", "read_ahead"])
def test_peak_memory_is_bounded_by_largest_tensor(tmp_path, big_models, depth):
    out = tmp_path / "avg"
    result = subprocess.run([sys.executable, "-c", MERGE_SCRIPT, *big_models, str(out), str(depth)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    growth, largest = int(result.stdout.split()[-1]), SIDE * SIDE * 4
    total = MODELS * TENSORS_PER_MODEL * largest
    assert total > 15 * ((MODELS + 2) * largest + OVERHEAD)  # the bound is far below the input
    assert growth <= (MODELS + 2) * largest + OVERHEAD, growth / largest
    with Checkpoint(str(out)) as merged:
        assert len(merged.names) == TENSORS_PER_MODEL
        for i in (0, 17, TENSORS_PER_MODEL - 1):  # mean over models of (model + i)
            assert np.all(merged.read(f"layer_{i}/kernel") == i + (MODELS - 1) / 2)


def test_read_ahead_keeps_order_and_stops_early():
    calls = []

    def read(i):
        calls.append(i)
        return np.full(3, i)

    values = [int(v[0]) for v in read_ahead((functools.partial(read, i) for i in range(7)), 2)]
    assert values == list(range(7))
    calls.clear()
    ahead = read_ahead(functools.partial(read, i) for i in range(100))
    next(ahead)
    ahead.close()
    assert len(calls) <= 2  # the one yielded and the one read ahead: no runaway reads


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _old_checkpoint(path):
    _write(path, {"old": np.arange(4, dtype=np.float32)})
    return _read_all(path)


def _assert_old_intact(path, old):
    loaded = _read_all(path)
    assert loaded.keys() == old.keys()
    for name in old:
        _assert_same(loaded[name], old[name], name)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from research.merge.stream import CheckpointWriter

    specs = [(f"t{i}", (256, 256), np.float32) for i in range(8)]
    writers = [CheckpointWriter(path, specs, max_shard_bytes=3 << 18) for path in sys.argv[1:]]
    for writer in writers:
        for name, shape, dtype in specs[:5]:  # mid-write: a shard half-filled, another done
            writer.write(name, np.ones(shape, dtype))
    print("ready", flush=True)
    time.sleep(60)
""")


def test_killed_writer_leaves_no_loadable_checkpoint(tmp_path):
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    old = _old_checkpoint(existing)
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(fresh), str(existing)],
                               stdout=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not fresh.exists()
    _assert_old_intact(existing, old)
    # The staging directories remain (hidden siblings) and are not checkpoints either.
    for path in (fresh, existing):
        (leftover,) = _siblings(path)
        with pytest.raises((ValueError, FileNotFoundError)):
            Checkpoint(str(tmp_path / leftover))


def test_exception_before_commit_discards_everything(tmp_path):
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    old = _old_checkpoint(existing)
    for path in (fresh, existing):
        with pytest.raises(RuntimeError, match="merge failed"):
            with CheckpointWriter(str(path), _specs(TENSORS), max_shard_bytes=64) as writer:
                writer.write("embed/table", TENSORS["embed/table"])
                raise RuntimeError("merge failed")
        assert _siblings(path) == []
    with pytest.raises(ValueError, match="without commit"):
        with CheckpointWriter(str(fresh), _specs(TENSORS)) as writer:
            writer.write("embed/table", TENSORS["embed/table"])
    assert not fresh.exists() and _siblings(fresh) == []
    _assert_old_intact(existing, old)


@pytest.mark.parametrize("swap", [True, False], ids=["renameat2_exchange", "two_renames"])
def test_commit_replaces_an_existing_checkpoint_whole(tmp_path, monkeypatch, swap):
    out = tmp_path / "out"
    _old_checkpoint(out)
    (out / "stale.txt").write_text("from the old checkpoint")
    if not swap:
        monkeypatch.setattr(stream, "_exchange", lambda a, b: False)
    with CheckpointWriter(str(out), _specs(NUMPY_TENSORS), max_shard_bytes=64) as writer:
        for name, value in NUMPY_TENSORS.items():
            writer.write(name, value)
        _assert_old_intact(out, {"old": np.arange(4, dtype=np.float32)})  # untouched so far
        writer.commit()
    assert "stale.txt" not in os.listdir(out) and _siblings(out) == []
    assert _read_all(out).keys() == NUMPY_TENSORS.keys()


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        CheckpointWriter(str(tmp_path), _specs(TENSORS))


def test_writer_rejects_bad_writes(tmp_path):
    with CheckpointWriter(str(tmp_path / "out"), _specs(NUMPY_TENSORS)) as writer:
        with pytest.raises(ValueError, match="expected 'embed/table' next"):
            writer.write("layer_0/kernel", NUMPY_TENSORS["layer_0/kernel"])
        with pytest.raises(ValueError, match=r"expected float32\[7, 5\], got float32\[5, 7\]"):
            writer.write("embed/table", NUMPY_TENSORS["embed/table"].T)
        with pytest.raises(ValueError, match=r"expected float32\[7, 5\], got float64"):
            writer.write("embed/table", NUMPY_TENSORS["embed/table"].astype(np.float64))
        writer.write("embed/table", NUMPY_TENSORS["embed/table"])
        with pytest.raises(ValueError, match="'layer_0/kernel' and 8 more were never written"):
            writer.commit()
        writer.abort()
    with pytest.raises(ValueError, match="tensor 'c': dtype .*complex64.* is not supported"):
        CheckpointWriter(str(tmp_path / "x"), [("c", (2,), np.complex64)])
    with pytest.raises(ValueError, match="tensor 'a' twice"):
        CheckpointWriter(str(tmp_path / "x"), [("a", (2,), np.float32)] * 2)
    with CheckpointWriter(str(tmp_path / "y"), [("a", (2,), np.float32)]) as writer:
        writer.write("a", np.zeros(2, np.float32))
        for name in ("../escape.json", "model.safetensors.index.json", "model.safetensors"):
            with pytest.raises(ValueError, match="plain file name other than the weights'"):
                writer.commit({name: "{}"})
        writer.abort()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickles_are_refused_unopened(tmp_path, file_name):
    marker = tmp_path / "pwned"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / file_name).write_bytes(pickle.dumps(_Payload(str(marker))))
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / file_name):
        with pytest.raises(ValueError, match=f"{file_name}: only safetensors checkpoints"):
            Checkpoint(str(path))
    assert not marker.exists()


def test_missing_tensor_names_the_closest(tmp_path):
    _write(tmp_path / "ckpt", TENSORS)
    with Checkpoint(str(tmp_path / "ckpt")) as checkpoint:
        with pytest.raises(ValueError, match="no tensor 'layer_0/kernal'; closest: layer_0/k"):
            checkpoint.read("layer_0/kernal")


def test_truncated_or_corrupt_files_name_the_file(tmp_path):
    _write(tmp_path / "ckpt", TENSORS, max_shard_bytes=64)
    with open(tmp_path / "ckpt" / stream.INDEX_FILE) as file:
        shard = str(tmp_path / "ckpt" / json.load(file)["weight_map"]["embed/table"])
    data = open(shard, "rb").read()
    for broken, what in ((data[:-10], "truncated: tensor 'embed/table'"),
                         (data[:5], "truncated or not a safetensors file"),
                         (data[:8] + b"{" * (len(data) - 8), "corrupt safetensors header")):
        with open(shard, "wb") as file:
            file.write(broken)
        with pytest.raises(ValueError, match=re.escape(f"{shard}: {what}")):
            Checkpoint(str(tmp_path / "ckpt"))
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{shard} is missing")):
        Checkpoint(str(tmp_path / "ckpt"))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        Checkpoint(str(tmp_path))


TIES_SCRIPT = textwrap.dedent("""
    import sys
    from research.merge import mergekit_config

    def status(field):
        with open("/proc/self/status") as file:
            return next(int(l.split()[1]) * 1024 for l in file if l.startswith(field + ":"))

    config, out_dir = sys.argv[1:]
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    start = status("VmRSS")
    mergekit_config.run(config, out_dir)
    print(status("VmHWM") - start)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_ties_merge_run_holds_a_few_tensors_not_the_models(tmp_path):
    """A whole mergekit-config TIES run (base + 3 models of 16 random 4 MiB tensors) peaks at
    the inputs of one tensor (4), the output and a spare (2), one selection scratch per worker
    thread and the next tensor's inputs read ahead, plus the fixed overhead: under one model."""
    import yaml

    from research.merge import mergekit_config

    rng = np.random.default_rng(0)
    dirs = []
    for model in range(4):
        specs = [(f"model.layers.{i}.mlp.weight", (SIDE, SIDE), np.float32) for i in range(16)]
        with CheckpointWriter(str(tmp_path / f"m{model}"), specs) as writer:
            for name, shape, dtype in specs:
                writer.write(name, rng.standard_normal(shape, dtype=dtype))
            writer.commit()
        dirs.append(str(tmp_path / f"m{model}"))
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": dirs[0],
        "models": [{"model": d, "parameters": {"weight": 1.0, "density": 0.3}}
                   for d in dirs[1:]]}))
    result = subprocess.run([sys.executable, "-c", TIES_SCRIPT, str(config), str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    largest, workers = SIDE * SIDE * 4, min(os.cpu_count(), 3)
    growth = int(result.stdout.split()[-1])
    read_ahead = mergekit_config.READ_AHEAD
    assert growth <= (4 + 2 + workers + read_ahead) * largest + OVERHEAD, growth / largest
    assert growth < 16 * largest  # under one model
