"""Compile-time benchmark: ``python -m launch.bench compile``.

How long JAX takes to build the Llama-3.2-1B full fine-tuning step (zoo preset ``llama_1b_lm``,
AdamW, batch 8 x 512 tokens, one device, the accel benchmark's engine settings by default:
bfloat16 compute, remat ``dots_no_batch``, fused attention, loss chunks of 4096 tokens) at 16
layers (the real depth) and at 2, with ``scan_layers`` on and, for context, off. Nothing is
allocated: the state and the batch are ShapeDtypeStructs as in the sharding benchmark, and only
``jit(step).lower(state, batch).compile()`` runs. Per case: ``lower_seconds`` (tracing and
lowering to StableHLO), ``xla_seconds`` (XLA's compilation) and ``compile_seconds``, their sum.

Each compilation runs in a fresh process with JAX's persistent compilation cache off (nor does
the environment's cache directory reach it), so no case reuses another's work: in one process
the second compilation would find primitives, lowering rules and XLA's backend already warm.
Each case is measured ``--repeats`` times (default 2), in rounds over the four cases, each
time in its own process, and the fastest kept. Prints ``key=value`` lines; the last is the
headline ``compile_depth16_over_depth2``: the scanned step's compile seconds at 16 layers over
those at 2 (about 1 when compilation does not grow with depth; about 8 when it grows
linearly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTHS = (16, 2)
DEFAULTS = dict(model="llama_1b_lm", batch=8, length=512, dtype="bfloat16",
                remat="dots_no_batch", attention="fused", loss_chunk=4096)


def compile_seconds(*, num_layers: int, scan: bool, model: str = DEFAULTS["model"],
                    batch: int = DEFAULTS["batch"], length: int = DEFAULTS["length"],
                    dtype: str = DEFAULTS["dtype"], remat: str = DEFAULTS["remat"],
                    attention: str = DEFAULTS["attention"],
                    loss_chunk: int = DEFAULTS["loss_chunk"]) -> dict:
    """Seconds to lower and to compile the full fine-tuning step of ``model`` at
    ``num_layers`` on one device, from abstract state and batch (in this process: whatever
    its caches hold counts; :func:`in_subprocess` measures from cold)."""
    import jax

    from configs import common
    from launch.bench_sharding import Workload, abstract_batch
    from research.train import loop

    config = common.base_config()
    config.model.name = model
    config.model.overrides = dict(num_layers=num_layers, dtype=dtype)
    config.model.scan_layers = scan
    config.model.remat = remat
    config.model.attention_impl = attention
    config.train.batch_size = batch
    config.train.loss_chunk = loss_chunk
    config.mesh = {"data": 1}
    setup = loop.make_setup(config, loop.build_model(config), 100, devices=jax.devices()[:1])
    state = setup.abstract_state
    inputs = abstract_batch(setup, Workload(model, {}, batch, length))
    step = loop.make_train_step(setup, int(config.train.grad_accum), config.train.rng_impl)
    start = time.perf_counter()
    lowered = step.lower(state, inputs)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"lower_seconds": lowered_at - start, "xla_seconds": done - lowered_at,
            "compile_seconds": done - start}


def worker(spec: str) -> None:
    """Print :func:`compile_seconds` of the JSON keyword arguments ``spec`` as one JSON line,
    with the persistent compilation cache off."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    figures = compile_seconds(**json.loads(spec))
    figures["persistent_cache"] = bool(jax.config.jax_enable_compilation_cache)
    print(json.dumps(figures))


def in_subprocess(**spec) -> dict:
    """:func:`compile_seconds` measured in a fresh process on one CPU-or-accelerator device,
    without the persistent compilation cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    code = f"from launch.bench_compile import worker; worker({json.dumps(spec)!r})"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"compiling {spec} failed:\n{out.stderr[-3000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    if figures.pop("persistent_cache"):
        raise RuntimeError("the persistent compilation cache was on in the measuring process")
    return figures


def main(argv=None) -> None:
    from launch.main import print_figure

    parser = argparse.ArgumentParser(prog="python -m launch.bench compile",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--length", type=int, default=DEFAULTS["length"])
    parser.add_argument("--dtype", default=DEFAULTS["dtype"])
    parser.add_argument("--remat", default=DEFAULTS["remat"])
    parser.add_argument("--attention", default=DEFAULTS["attention"])
    parser.add_argument("--loss_chunk", type=int, default=DEFAULTS["loss_chunk"])
    parser.add_argument("--repeats", type=int, default=2,
                        help="processes per case, in rounds over the cases; the fastest counts")
    args = parser.parse_args(argv)
    spec = dict(batch=args.batch, length=args.length, dtype=args.dtype, remat=args.remat,
                attention=args.attention, loss_chunk=args.loss_chunk)
    for key, value in spec.items():
        print_figure(key, value)
    print_figure("persistent_cache", "off")
    print_figure("fresh_process_per_compile", True)
    cases = [(scan, depth) for scan in (False, True) for depth in DEPTHS]  # scanned last
    best = {}
    for _ in range(args.repeats):  # round by round, so every case sees the same conditions
        for scan, depth in cases:
            figures = in_subprocess(num_layers=depth, scan=scan, **spec)
            if (scan, depth) not in best or (figures["compile_seconds"]
                                             < best[scan, depth]["compile_seconds"]):
                best[scan, depth] = figures
    print_figure("repeats", args.repeats)
    for (scan, depth), figures in best.items():
        name = f"{'scan' if scan else 'unrolled'}_depth{depth}"
        for key in ("lower_seconds", "xla_seconds", "compile_seconds"):
            print_figure(f"{name}_{key}", figures[key], ".2f")
    seconds = {case: figures["compile_seconds"] for case, figures in best.items()}
    print_figure("unrolled_compile_depth16_over_depth2",
                 seconds[False, 16] / seconds[False, 2], ".3f")
    print_figure("scan_over_unrolled_compile_depth16", seconds[True, 16] / seconds[False, 16],
                 ".3f")
    print_figure("compile_depth16_over_depth2", seconds[True, 16] / seconds[True, 2], ".3f")


if __name__ == "__main__":
    main()
