"""The sharding benchmark's accounting (8 fake CPU devices): per-device bytes from the
shardings divide as the rules say, and agree with XLA's compiled argument size."""

import jax
import numpy as np

from launch import bench_sharding
from research import tree

TINY = bench_sharding.Workload("bert_tiny_classifier", {"num_classes": 2}, 8, 16)


def _state_leaves(setup) -> dict:
    """Params and optimizer state, one ShapeDtypeStruct per path."""
    state = setup.abstract_state
    return {**tree.flatten({"params": {**state["trainable"], **state["frozen"]}}),
            **{"/".join(map(str, path)): leaf for path, leaf
               in jax.tree_util.tree_leaves_with_path(state["opt_state"])}}


def test_fsdp_shards_are_an_eighth_of_every_leaf_that_divides():
    one = _state_leaves(bench_sharding.sharded_setup(TINY, {"fsdp": 1}, jax.devices()[:1]))
    eight = _state_leaves(bench_sharding.sharded_setup(TINY, {"fsdp": 8}, jax.devices()))
    assert one.keys() == eight.keys()
    split_bytes = 0
    for path, leaf in eight.items():
        full = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        assert bench_sharding.shard_bytes(one[path]) == full, path
        split = "fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec))
        assert bench_sharding.shard_bytes(leaf) == (full // 8 if split else full), path
        split_bytes += full if split else 0
    total_one = bench_sharding.shard_bytes(list(one.values()))
    # Only vectors over unsplit axes (biases of 'mlp', counters) stay whole.
    assert split_bytes > 0.95 * total_one
    assert bench_sharding.shard_bytes(list(eight.values())) < 0.15 * total_one


def test_state_bytes_match_the_compiled_arguments():
    figures = bench_sharding.step_memory(TINY, "fsdp_tp", jax.devices())
    assert figures["arguments_minus_state"] == 0
    assert figures["params"] > 0 and figures["opt"] > figures["params"] and figures["temp"] > 0
