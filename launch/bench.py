"""Benchmarks: ``python -m launch.bench NAME``; figures print as ``key=value``, the last line
is the headline ratio.

Only ratios measured side by side in one process are compared (the machines are noisy); FLOPs
and bytes come from XLA's deterministic ``cost_analysis()`` and ``memory_analysis()``.
"""

from __future__ import annotations

import argparse
import sys
import time

MINILM_BATCH, MINILM_LENGTH = 32, 64


def _best_seconds(fn, repeats: int) -> float:
    """Fastest of ``repeats`` calls of ``fn()`` (blocking on the result): the least noisy
    estimate on a shared machine."""
    import jax

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(size: int = 2048):
    """A function timing one large float32 matmul, and its FLOPs: the machine's practical
    peak for XLA here."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    return (lambda: matmul(a, b)), 2 * size**3


def minilm_setup(mesh: dict, steps: int = 10, method: dict | None = None, devices=None):
    """A MiniLM-size run (random weights: same shapes and FLOPs), full fine-tuning unless a
    ``method`` config is given."""
    from configs import common
    from research.train import loop

    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.model.name = "minilm_l6_classifier"
    config.model.overrides = dict(num_classes=2)
    config.train.batch_size = MINILM_BATCH
    config.train.steps = steps
    config.mesh = mesh
    if method is not None:
        config.method = method
        config.optim.learning_rate = 5e-4
    model = loop.build_model(config)
    return config, loop.make_setup(config, model, steps, devices=devices)


def minilm_batch(setup):
    import numpy as np

    from research.train import loop

    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(1000, 30000, (MINILM_BATCH, MINILM_LENGTH)).astype(np.int32),
        "attention_mask": np.ones((MINILM_BATCH, MINILM_LENGTH), np.int32),
        "token_type_ids": np.zeros((MINILM_BATCH, MINILM_LENGTH), np.int32),
        "label": rng.integers(0, 2, (MINILM_BATCH,)).astype(np.int32),
    }
    return loop.global_batch(setup, batch)


def bench_train_step() -> None:
    import jax

    from launch.bench_sharding import in_subprocess
    from research.train import loop

    matmul, matmul_flops = matmul_rate()
    config, setup = minilm_setup({"data": 1}, steps=100)
    holder = {"state": loop.init_state(config, setup)}
    batch = minilm_batch(setup)
    compiled = loop.make_train_step(setup).lower(holder["state"], batch).compile()
    flops = float(compiled.cost_analysis()["flops"])

    def one_step():
        holder["state"] = compiled(holder["state"], batch)[0]
        return holder["state"]["step"]

    one_step()
    # Alternate the two measurements so that both see the same machine conditions.
    peak_seconds, step_seconds = float("inf"), float("inf")
    for _ in range(5):
        peak_seconds = min(peak_seconds, _best_seconds(matmul, 3))
        step_seconds = min(step_seconds, _best_seconds(one_step, 2))
    peak = matmul_flops / peak_seconds
    memory = {n: in_subprocess(n, ("minilm",), ("fsdp",))["minilm"]["fsdp"] for n in (1, 8)}
    print(f"backend={jax.default_backend()}")
    print(f"matmul_peak_gflops={peak / 1e9:.1f}")
    print(f"step_gflop={flops / 1e9:.2f}")
    print(f"step_seconds={step_seconds:.4f}")
    print(f"step_gflops_per_s={flops / step_seconds / 1e9:.1f}")
    print(f"tokens_per_s={MINILM_BATCH * MINILM_LENGTH / step_seconds:.0f}")
    for n, figures in memory.items():
        print(f"param_opt_bytes_per_device_{n}dev={figures['params'] + figures['opt']}")
        print(f"temp_bytes_per_device_{n}dev={figures['temp']}")
    fsdp_ratio = ((memory[8]["params"] + memory[8]["opt"])
                  / (memory[1]["params"] + memory[1]["opt"]))
    print(f"fsdp8_over_1dev_bytes={fsdp_ratio:.4f}")
    print(f"step_flops_per_s_over_matmul_peak={flops / step_seconds / peak:.3f}")


def bench_lora() -> None:
    from launch.bench_lora import bench_lora as run
    run()


def bench_lora_variants() -> None:
    from launch.bench_lora import bench_variants
    bench_variants()


def bench_merge() -> None:
    from launch.bench_merge import main as run
    run([])


def bench_masks() -> None:
    from launch.bench_masks import main as run
    run()


def bench_fusion() -> None:
    from launch.bench_fusion import main as run
    run([])


def bench_sharding() -> None:
    from launch.bench_sharding import main as run
    run([])


def bench_accel(argv=()) -> None:
    from launch.bench_accel import main as run
    run(list(argv))


def bench_tuners(argv=()) -> None:
    from launch.bench_tuners import bench_tuners as run
    run(argv)


def bench_compile(argv=()) -> None:
    from launch.bench_compile import main as run
    run(list(argv))


BENCHMARKS = {"train_step": bench_train_step, "lora": bench_lora,
              "lora_variants": bench_lora_variants, "merge": bench_merge, "masks": bench_masks,
              "fusion": bench_fusion, "sharding": bench_sharding, "accel": bench_accel,
              "compile": bench_compile, "tuners": bench_tuners}
# Benchmarks that take their own flags (``python -m launch.bench accel --small``).
WITH_OPTIONS = ("accel", "compile", "tuners")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench")
    parser.add_argument("name", help=f"one of {sorted(BENCHMARKS)}")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help=f"the benchmark's own flags (only {', '.join(WITH_OPTIONS)})")
    args = parser.parse_args(argv)
    if args.name not in BENCHMARKS:
        print(f"error: benchmark {args.name!r} is not one of {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    if args.name in WITH_OPTIONS:
        BENCHMARKS[args.name](args.options)
    elif args.options:
        print(f"error: benchmark {args.name!r} takes no options; got {args.options}",
              file=sys.stderr)
        return 2
    else:
        BENCHMARKS[args.name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
