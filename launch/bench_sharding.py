"""Sharding benchmark: ``python -m launch.bench sharding`` (``python -m launch.bench_sharding
--table FILE`` also writes the table to FILE).

How much of a training step one device holds under each sharding layout, from XLA's
deterministic ``memory_analysis()`` of the compiled step alone: the state and the batch are
ShapeDtypeStructs carrying their shardings, so nothing is allocated and the 1B model never
runs. Three workloads, full fine-tuning with AdamW, float32 params and compute (the presets'
defaults): MiniLM (classifier, batch 32 x 64 tokens) and Llama-3.2-1B's shapes (causal LM,
batch 8 x 512 tokens), unrolled and scanned with full remat (``llama_1b_scan``). Layouts on 1, 2, 4 and 8 fake CPU devices: data parallel
(``data=N``), FSDP (``fsdp=N``) and FSDP + tensor parallel (``fsdp=N/2, tensor=2``); on one
device the three are one program.

Per device: parameters and optimizer state are the shard sizes of the state's leaves (what the
shardings say); temporaries are XLA's ``temp_size_in_bytes`` (activations, gradients, gathered
weights). The compiled argument size, less the batch and the step counter and key, must equal
the first two: ``arguments_minus_state_bytes_max`` says by how much it does not.

A fake device count is fixed when JAX starts, so each count is measured in its own process;
the ``XLA_FLAGS`` this command sees pass on to them (say
``--xla_cpu_enable_concurrency_optimized_scheduler=false``: XLA:CPU's memory-minimising
schedule instead of its default, which favours concurrency and so holds more temporaries).

Prints the table as Markdown, then ``key=value`` figures ending with ``fsdp8_over_1dev_bytes``:
the scanned 1B model's per-device params + optimizer state + temporaries under 8-device FSDP
over one device's (the MiniLM and unrolled 1B ones just before it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import NamedTuple


class Workload(NamedTuple):
    model: str         # a zoo name
    overrides: dict    # ModelConfig fields
    batch: int         # rows: every one here splits evenly over 8 devices
    tokens: int
    engine: dict = {}  # config.model's engine keys (scan_layers, remat)


SCANNED = {"scan_layers": True, "remat": "full"}
MODELS = {
    "minilm": Workload("minilm_l6_classifier", {"num_classes": 2}, 32, 64),
    "llama_1b": Workload("llama_1b_lm", {}, 8, 512),
    "llama_1b_scan": Workload("llama_1b_lm", {}, 8, 512, SCANNED),
}
LAYOUTS = ("dp", "fsdp", "fsdp_tp")
DEVICE_COUNTS = (1, 2, 4, 8)
COLUMNS = ("params", "opt", "temp")
MB = 1e6


def mesh_shape(layout: str, devices: int) -> dict:
    """``config.mesh`` of ``layout`` on ``devices`` devices."""
    if layout == "dp":
        return {"data": devices}
    if layout == "fsdp":
        return {"fsdp": devices}
    if layout == "fsdp_tp":
        tensor = min(devices, 2)
        return {"fsdp": devices // tensor, "tensor": tensor}
    raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")


def sharded_setup(workload: Workload, mesh: dict, devices):
    """The training loop's setup of ``workload`` over ``devices`` arranged as ``mesh``."""
    from configs import common
    from research.train import loop

    config = common.base_config()
    config.model.name = workload.model
    config.model.overrides = workload.overrides
    config.model.update(workload.engine)
    config.train.batch_size = workload.batch
    config.mesh = mesh
    return loop.make_setup(config, loop.build_model(config), 100, devices=devices)


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays). Shards are
    even: the rules only split dimensions the mesh axes divide."""
    import jax

    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def abstract_batch(setup, workload: Workload) -> dict:
    """The model's inputs (and a label for a classifier) as ShapeDtypeStructs split along the
    batch rule."""
    import jax
    import numpy as np

    from research.train import sharding

    target = sharding.batch_sharding(setup.mesh, setup.rules)
    inputs = setup.model.dummy_inputs(workload.batch, workload.tokens)
    if setup.model.task == "classification":
        inputs["label"] = np.zeros((workload.batch,), np.int32)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=target) for k, v in inputs.items()}


def step_memory(workload: Workload, layout: str, devices) -> dict:
    """Per-device bytes of the compiled training step of ``workload`` in ``layout`` over
    ``devices``, and the seconds its compilation took."""
    from research.train import loop

    setup = sharded_setup(workload, mesh_shape(layout, len(devices)), devices)
    state, batch = setup.abstract_state, abstract_batch(setup, workload)
    start = time.perf_counter()
    memory = loop.make_train_step(setup).lower(state, batch).compile().memory_analysis()
    seconds = time.perf_counter() - start
    params = shard_bytes({"trainable": state["trainable"], "frozen": state["frozen"]})
    opt = shard_bytes(state["opt_state"])
    others = shard_bytes(batch) + shard_bytes({k: state[k] for k in ("step", "rng")})
    return {"params": params, "opt": opt, "temp": int(memory.temp_size_in_bytes),
            "arguments_minus_state": int(memory.argument_size_in_bytes) - others - params - opt,
            "compile_seconds": seconds}


def worker(models: tuple, layouts: tuple) -> None:
    """Print, as one JSON line, :func:`step_memory` of every model in every layout over all
    devices (run under ``--xla_force_host_platform_device_count``)."""
    import jax

    print(json.dumps({model: {layout: step_memory(MODELS[model], layout, jax.devices())
                              for layout in layouts} for model in models}))


def in_subprocess(devices: int, models: tuple = tuple(MODELS), layouts: tuple = LAYOUTS) -> dict:
    """:func:`worker`'s figures, ``{model: {layout: figures}}``, measured on ``devices`` fake
    CPU devices in a fresh process."""
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    code = f"from launch.bench_sharding import worker; worker({models!r}, {layouts!r})"
    env = dict(os.environ, XLA_FLAGS=" ".join(flags))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measuring on {devices} devices failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def total(figures: dict) -> int:
    return sum(figures[k] for k in COLUMNS)


def main(argv=None) -> None:
    from launch.main import print_figure

    parser = argparse.ArgumentParser(prog="python -m launch.bench_sharding",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--table", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    # On one device the layouts coincide: one compilation stands for all three.
    results = {n: in_subprocess(n, layouts=LAYOUTS if n > 1 else ("fsdp",))
               for n in DEVICE_COUNTS}
    figures = {(model, layout, n): results[n][model][layout if n > 1 else "fsdp"]
               for model in MODELS for layout in LAYOUTS for n in DEVICE_COUNTS}

    lines = ["| model | layout | devices | params MB | opt MB | temp MB | total MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (model, layout, n), f in figures.items():
        sizes = [f[k] / MB for k in COLUMNS] + [total(f) / MB]
        lines.append(f"| {model} | {layout} | {n} | "
                     + " | ".join(f"{s:.1f}" for s in sizes) + " |")
    print("\n".join(lines))
    if args.table:
        with open(args.table, "w") as file:
            file.write("\n".join(lines) + "\n")

    compiled = [f for by_model in results.values() for by_layout in by_model.values()
                for f in by_layout.values()]
    print_figure("arguments_minus_state_bytes_max",
                 max(abs(f["arguments_minus_state"]) for f in compiled))
    print_figure("compilations", len(compiled))
    print_figure("compile_seconds_max", max(f["compile_seconds"] for f in compiled), ".1f")
    print_figure("seconds", time.perf_counter() - start, ".0f")
    for model in MODELS:
        one, eight = figures[model, "fsdp", 1], figures[model, "fsdp", 8]
        # The headline's two parts: the state divides by the rules, temporaries by XLA's schedule.
        print_figure(f"{model}_fsdp8_over_1dev_state_bytes",
                     (eight["params"] + eight["opt"]) / (one["params"] + one["opt"]))
        print_figure(f"{model}_fsdp8_over_1dev_temp_bytes", eight["temp"] / one["temp"])
    ratios = {model: total(figures[model, "fsdp", 8]) / total(figures[model, "fsdp", 1])
              for model in MODELS}
    print_figure("minilm_fsdp8_over_1dev_bytes", ratios["minilm"])
    print_figure("llama_1b_unrolled_fsdp8_over_1dev_bytes", ratios["llama_1b"])
    print_figure("fsdp8_over_1dev_bytes", ratios["llama_1b_scan"])


if __name__ == "__main__":
    main()
