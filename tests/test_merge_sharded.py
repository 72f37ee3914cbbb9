"""Sharded merges: whole-tensor statistics combined across pieces equal the whole tensor's
(exact k-th smallest, ties taken in row order), so a tensor merged block by block equals the
tensor merged whole; ``merge_checkpoints`` over orbax checkpoints equals ``trees.merge`` of the
same trees, on one process with 8 fake devices and on two processes over loopback, where each
process merges only its own rows."""

import json
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from launch import local
from research import tree
from research.merge import kernels, sharded, sparsify, trees
from research.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trees(count, seed=0):
    """A base and ``count`` fine-tunes: a matrix whose 16 rows divide the devices, one whose 6
    rows do not, vectors (one bfloat16), a scalar and an integer leaf; deltas on a grid of
    quarters, so with many exact ties."""
    rng = np.random.default_rng(seed)
    shapes = {"embed/table": (16, 6), "layers_0/kernel": (16, 6), "layers_0/bias": (16,),
              "layers_1/kernel": (6, 4), "layers_1/scale": (5,), "head/temperature": ()}

    def draw():
        flat = {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}
        flat["layers_1/scale"] = flat["layers_1/scale"].astype(jnp.bfloat16)
        return flat

    base = draw()
    models = [{p: base[p] + np.round(d * 2) / 4 for p, d in draw().items()} for _ in range(count)]
    def with_step(flat):
        return tree.unflatten({**flat, "step": np.int32(7)})
    return with_step(base), [with_step(m) for m in models]


def _save(path, params):
    with ocp.StandardCheckpointer() as saver:
        saver.save(str(path), params)
    return str(path)


def _load(path):
    """A saved params checkpoint as numpy arrays, whatever mesh wrote it."""
    with ocp.PyTreeCheckpointer() as reader:
        metadata = reader.metadata(str(path)).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        return reader.restore(str(path), args=ocp.args.PyTreeRestore(restore_args=args))


def _assert_trees_equal(actual, expected, rtol=0.0):
    expected = tree.flatten(expected)
    actual = tree.flatten(actual)
    assert actual.keys() == expected.keys()
    for path in expected:
        assert np.asarray(actual[path]).dtype == np.asarray(expected[path]).dtype, path
        np.testing.assert_allclose(np.asarray(actual[path], np.float64),
                                   np.asarray(expected[path], np.float64),
                                   rtol=rtol, atol=rtol * 1e-3, err_msg=path)


# ---------------------------------------------------------------------------------------------
# Statistics across pieces
# ---------------------------------------------------------------------------------------------


class _Threads(sharded.Distributed):
    """Pieces merged in threads of one process, exchanging partials through a barrier instead
    of an all-gather: the kernels' piecewise logic without starting processes."""

    def __init__(self, index, position, slots, barrier):
        super().__init__(position)
        self.index, self.slots, self.barrier = index, slots, barrier

    def _gather(self, value):
        self.slots[self.index] = np.asarray(value)
        self.barrier.wait()
        gathered = np.stack(self.slots)
        self.barrier.wait()
        return gathered


def _merge_in_pieces(method, tensors, base, params, pieces=4):
    """``merge_tensor`` of each block of rows in its own thread, concatenated."""
    rows = np.array_split(np.arange(tensors[0].shape[0]), pieces)
    slots, barrier = [None] * pieces, threading.Barrier(pieces)
    results, errors = [None] * pieces, []

    def run(index):
        block = slice(rows[index][0], rows[index][-1] + 1)
        try:
            results[index] = kernels.merge_tensor(
                method, [t[block] for t in tensors], None if base is None else base[block],
                params, tensor_name=f"x@{block.start}",
                stats=_Threads(index, block.start, slots, barrier))
        except Exception as err:  # noqa: BLE001 -- reported below, after every thread ends
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(pieces)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    return np.concatenate(results)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distributed_statistics_on_one_process_equal_whole(dtype):
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(size=300), np.round(rng.normal(size=200)), [0.0, -0.0,
                             -np.inf, np.inf, 1e-40]]).astype(dtype)
    stats = sharded.Distributed()
    for k in (1, 2, 7, 150, 251, len(values) - 1, len(values)):
        assert stats.kth_smallest(values, k) == sparsify.WHOLE.kth_smallest(values.copy(), k), k
    dot = np.dot(values[:300], values[:300])
    assert stats.total(dot) == dot and stats.total(dot).dtype == dtype
    assert stats.total(values.size) == values.size and np.ndim(stats.total(values.size)) == 0
    assert stats.equal_before(5) == 0


@pytest.mark.parametrize("method,params,exact", [
    ("task_arithmetic", {"weight": [0.7, -0.3, 1.0], "lambda": 1.2}, True),
    ("ties", {"weight": [1.0, 0.5, 0.8], "density": [0.3, 0.55, 0.2]}, True),
    ("breadcrumbs_ties", {"weight": 1.0, "density": 0.4, "gamma": 0.1}, True),
    ("model_stock", {}, False),
    ("model_stock", {"filter_wise": True}, True),
])
def test_merging_in_row_blocks_equals_merging_whole(method, params, exact):
    """Ties (deltas on a grid of quarters) straddle the blocks, so the threshold and which tied
    entries are kept depend on the other blocks."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=(24, 10)).astype(np.float32)
    tensors = [base + np.round(rng.normal(size=base.shape) * 4) / 4 for _ in range(3)]
    pieces = _merge_in_pieces(method, tensors, base, params)
    whole = kernels.merge_tensor(method, tensors, base, params)
    np.testing.assert_allclose(pieces, whole, rtol=0 if exact else 1e-6)


def test_random_drops_in_row_blocks_keep_density_and_l1():
    """DARE and DELLA rescale each task vector to its L1 norm over the whole tensor."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(64, 32)).astype(np.float32)
    tensors = [base + rng.normal(size=base.shape).astype(np.float32)]
    for method, params in [("dare_linear", {"weight": 1.0, "density": 0.3}),
                           ("della_linear", {"weight": 1.0, "density": 0.3, "epsilon": 0.1})]:
        delta = _merge_in_pieces(method, tensors, base, params) - base
        assert abs(np.count_nonzero(delta) / delta.size - 0.3) < 0.03, method
        np.testing.assert_allclose(np.abs(delta).sum(), np.abs(tensors[0] - base).sum(),
                                   rtol=1e-5, err_msg=method)


def test_slerp_in_row_blocks_equals_whole():
    rng = np.random.default_rng(4)
    base, other = rng.normal(size=(2, 12, 5)).astype(np.float32)
    np.testing.assert_allclose(_merge_in_pieces("slerp", [other], base, {"t": 0.3}),
                               kernels.merge_tensor("slerp", [other], base, {"t": 0.3}),
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Orbax checkpoints on one process, 8 fake devices
# ---------------------------------------------------------------------------------------------


CASES = [
    ("linear", {}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}]),
    ("task_arithmetic", {"lambda": [(r"layers_0/.*", 1.5), (r".*", 0.8)]},
     [{"weight": 1.0}, {"weight": -0.5}, {"weight": [0.2, 1.0]}]),
    ("ties", {"density": [(r"layers_.*", 0.3), (r".*", 0.6)]},
     [{"weight": 1.0}, {"weight": 0.7}, {"weight": 0.4}]),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1, "weight": 1.0}, None),
    ("model_stock", {}, None),
    ("dare_ties", {"density": 0.5, "weight": 1.0}, None),
    ("della", {"density": 0.5, "epsilon": 0.1, "weight": 1.0}, None),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    base, models = _trees(3)
    return (folder, base, models, _save(folder / "base", base),
            [_save(folder / f"model_{i}", m) for i, m in enumerate(models)])


@pytest.mark.parametrize("method,parameters,model_parameters", CASES)
def test_merge_checkpoints_equals_tree_merge(saved, method, parameters, model_parameters):
    """One process holds every row, so it merges leaves whole, random drops included."""
    folder, base, models, base_path, model_paths = saved
    out = sharded.merge_checkpoints(method, model_paths, base_path, str(folder / method),
                                    parameters=parameters, model_parameters=model_parameters)
    expected = trees.merge(method, models, base, parameters=parameters,
                           model_parameters=model_parameters)
    _assert_trees_equal(_load(out), expected)


def test_merged_checkpoint_is_written_in_row_shards(saved):
    folder, base, models, base_path, model_paths = saved
    out = sharded.merge_checkpoints("slerp", model_paths[:1], base_path, str(folder / "slerp"),
                                    parameters={"t": 0.3}, group_bytes=1)
    _assert_trees_equal(_load(out), trees.merge("slerp", models[:1], base,
                                                parameters={"t": 0.3}))
    with ocp.PyTreeCheckpointer() as reader:
        metadata = tree.flatten(reader.metadata(out).item_metadata.tree)
    assert tuple(metadata["embed/table"].sharding.partition_spec) == ("rows",)
    assert tuple(metadata["layers_1/kernel"].sharding.partition_spec) == ()  # 6 rows, 8 devices


def test_merge_checkpoints_reads_scion_runs(saved, tmp_path):
    """A run folder's newest train state: params are its trainable and frozen trees."""
    folder, base, models, base_path, model_paths = saved
    runs = []
    for index, params in enumerate(models[:2]):
        trainable = {"layers_0": params["layers_0"], "layers_1": params["layers_1"]}
        frozen = {k: v for k, v in params.items() if k not in trainable}
        manager = checkpoint.make_manager(str(tmp_path / f"run_{index}"), async_save=False)
        state = {"step": np.int32(5), "rng": np.zeros(2, np.uint32), "trainable": trainable,
                 "frozen": frozen, "opt_state": {"mu": trainable}}
        checkpoint.save(manager, 5, state, None)
        manager.close()
        runs.append(str(tmp_path / f"run_{index}"))
    out = sharded.merge_checkpoints("ties", runs, base_path, str(tmp_path / "merged"),
                                    parameters={"density": 0.5, "weight": 1.0})
    _assert_trees_equal(_load(out), trees.merge("ties", models[:2], base,
                                                parameters={"density": 0.5, "weight": 1.0}))


def test_bad_input_is_one_line_errors(saved, tmp_path):
    folder, base, models, base_path, model_paths = saved
    other = _save(tmp_path / "other", {**base, "embed": {"table": np.zeros((8, 6), np.float32)}})
    with pytest.raises(ValueError, match="embed/table.*shape"):
        sharded.merge_checkpoints("linear", [model_paths[0], other], None, str(tmp_path / "o"),
                                  parameters={"weight": 1.0})
    with pytest.raises(ValueError, match="exists"):
        sharded.merge_checkpoints("linear", model_paths, None, base_path,
                                  parameters={"weight": 1.0})
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        sharded.merge_checkpoints("linear", [str(tmp_path / "missing")], None,
                                  str(tmp_path / "o"), parameters={"weight": 1.0})
    with pytest.raises(ValueError, match="unknown merge method 'tie'.*ties"):
        sharded.merge_checkpoints("tie", model_paths, base_path, str(tmp_path / "o"))
    nan = _save(tmp_path / "nan", {**models[0], "head": {"temperature": np.float32(np.nan)}})
    with pytest.raises(ValueError, match="model 1 has NaN or Inf in head/temperature"):
        sharded.merge_checkpoints("linear", [model_paths[0], nan], None, str(tmp_path / "o"),
                                  parameters={"weight": 1.0})
    assert not os.path.exists(tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# Two processes over loopback, 2 fake devices each
# ---------------------------------------------------------------------------------------------


def test_two_processes_merge_their_own_rows(tmp_path):
    base, models = _trees(3, seed=5)
    big = np.random.default_rng(6).normal(size=(2, 64, 32)).astype(np.float32)
    base["big"], models[0]["big"] = big[0], big[0] + big[1]
    for model in models[1:]:
        model["big"] = big[0] + np.round(big[1] * 2) / 2
    base_path = _save(tmp_path / "base", base)
    model_paths = [_save(tmp_path / f"model_{i}", m) for i, m in enumerate(models)]
    ties = {"density": [(r"layers_.*", 0.3), (r".*", 0.6)], "weight": [1.0, 0.5, 0.8]}
    dare = {"density": 0.3, "weight": 1.0}
    nuslerp = {"weight": [1.0, 2.0], "nuslerp_row_wise": True,  # normalises over axis 0
               "nuslerp_flatten": [[r"head/.*", True], [r".*", False]]}
    jobs = [
        dict(method="ties", model_paths=model_paths, base_path=base_path,
             out_path=str(tmp_path / "ties"), parameters=ties),
        dict(method="slerp", model_paths=model_paths[:1], base_path=base_path,
             out_path=str(tmp_path / "slerp"), parameters={"t": 0.3}),
        dict(method="dare_linear", model_paths=model_paths[:1], base_path=base_path,
             out_path=str(tmp_path / "dare"), parameters=dare),
        dict(method="nuslerp", model_paths=model_paths[:2], base_path=None,
             out_path=str(tmp_path / "nuslerp"), parameters=nuslerp),
    ]
    with open(tmp_path / "jobs.json", "w") as f:
        json.dump(jobs, f)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    port = str(local.free_port())
    workers = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests",
                                                             "sharded_merge_worker.py"),
                                 str(i), port, str(tmp_path)], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    logs, deadline = [], time.monotonic() + 120
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    finally:
        for worker in workers:
            worker.kill()
    assert all(w.returncode == 0 for w in workers), "\n".join(l[-3000:] for l in logs)

    restored = _load(tmp_path / "ties")
    _assert_trees_equal(restored, trees.merge("ties", models, base, parameters=ties))
    _assert_trees_equal(_load(tmp_path / "slerp"),
                        trees.merge("slerp", models[:1], base, parameters={"t": 0.3}),
                        rtol=1e-6)
    _assert_trees_equal(_load(tmp_path / "nuslerp"),
                        trees.merge("nuslerp", models[:2], parameters=nuslerp), rtol=1e-6)
    delta = _load(tmp_path / "dare")["big"] - base["big"]
    assert abs(np.count_nonzero(delta) / delta.size - 0.3) < 0.03
    np.testing.assert_allclose(np.abs(delta).sum(), np.abs(big[1]).sum(), rtol=1e-5)

    for process in range(2):
        with open(tmp_path / f"report_{process}.json") as f:
            report = json.load(f)
        assert (report["devices"], report["local_devices"]) == (4, 2)
        pieces = report["pieces"]["ties"]
        # 16 and 64 rows over 4 devices: this process's 2 devices hold a contiguous half.
        assert pieces[f"embed/table@{8 * process}"] == [8, 6]
        assert pieces[f"big@{32 * process}"] == [32, 32]
        assert pieces[f"layers_0/bias@{8 * process}"] == [8]
        # 6 rows and scalars do not divide 4 devices: merged whole, by every process.
        assert pieces["layers_1/kernel"] == [6, 4] and pieces["head/temperature"] == []
        assert len(pieces) == 7
        gathered = report["pieces"]["nuslerp"]
        assert gathered["embed/table"] == [16, 6] and gathered["big"] == [64, 32]
        assert len(gathered) == 7
