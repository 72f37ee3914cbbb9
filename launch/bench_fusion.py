"""Fusion benchmark: ``python -m launch.bench fusion`` (flags: ``python -m launch.bench_fusion``).

Wall time of transformer fusion (Imfeld et al., 2024, "Transformer Fusion with Optimal
Transport") of two ViT-B/16-shaped models (independent random inits; ``--small``: ViT-tiny),
stage by stage, each stage blocking on its result:

* OT fusion with activation costs (Sinkhorn, the library's default options): activation
  statistics on ``--images`` random images in batches of ``--batch``, cost matrices, solves,
  rewriting B in A's bases (``apply_maps``), the average;
* the same with weight costs (no activation stage);
* git-re-basin's permutation weight matching (Ainsworth et al., 2023) + rewrite + average.

``align`` and ``weight_matching`` build each cost just before solving it, so the solves are
split out by wrapping the solvers for the duration of the run (each waits for its cost, then is
timed to its plan); the rest of alignment (costs, finiteness checks, plans to maps) is reported
as ``costs_s``. JAX's compilation caches are cleared before each method, so every total
includes its compilations, as in a fresh process. Beside the wall times, the activation
stage's FLOPs from XLA's ``cost_analysis`` (deterministic) and the seconds they would take at
a large matmul's rate measured in the same process: a floor for that stage on this machine.
Prints ``key=value`` lines; the last is ``fusion/total_s``, the activation OT fusion's total
seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from unittest import mock

MODELS = {"full": "vit_b16_classifier", "small": "vit_tiny_classifier"}


@contextlib.contextmanager
def solver_clock():
    """Seconds spent in, and calls of, ``solvers.assignment`` and ``solvers.sinkhorn`` inside
    the block: each call first waits for its inputs, so pending cost work is not counted."""
    import jax

    from research.fusion import solvers

    spent = {"seconds": 0.0, "calls": 0}

    def timed(solver):
        def run(*args, **kwargs):
            jax.block_until_ready((args, kwargs))
            start = time.perf_counter()
            plan = jax.block_until_ready(solver(*args, **kwargs))
            spent["seconds"] += time.perf_counter() - start
            spent["calls"] += 1
            return plan
        return run

    with mock.patch.object(solvers, "assignment", timed(solvers.assignment)), \
            mock.patch.object(solvers, "sinkhorn", timed(solvers.sinkhorn)):
        yield spent


def run_method(name: str, align, spec, params_a: dict, params_b: dict, collect=None) -> dict:
    """Stage seconds of one fusion method: ``collect()`` (optional) gives activation
    statistics, ``align(stats)`` the maps; then B is rewritten and averaged with A."""
    import jax

    from research import tree
    from research.fusion.align import apply_maps

    seconds = {}

    def timed(stage, fn, *args):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        seconds[stage] = time.perf_counter() - start
        return result

    jax.clear_caches()
    stats = timed("collect_s", collect) if collect else None
    with solver_clock() as solves:
        maps = timed("align_s", align, stats)
    aligned = timed("rewrite_s", apply_maps, spec, maps, params_b)
    timed("average_s", tree.lerp, params_a, aligned, 0.5)
    total = sum(seconds.values())
    print(f"# {name}: {total:.1f} s", file=sys.stderr, flush=True)
    figures = {"collect_s": seconds["collect_s"]} if collect else {}
    return {**figures, "costs_s": seconds["align_s"] - solves["seconds"],
            "solves_s": solves["seconds"], "solver_calls": solves["calls"],
            "rewrite_s": seconds["rewrite_s"], "average_s": seconds["average_s"],
            "total_s": total}


def collect_gflop(spec, model, params: dict, batches: list[dict]) -> float:
    """XLA's FLOPs (``cost_analysis``, deterministic) of the activation statistics over
    ``batches``: both models' forward passes and the sums
    :func:`~research.fusion.activations.collect` accumulates."""
    import jax

    from research.fusion import activations

    def batch_stats(params_a, params_b, inputs):
        return activations.site_stats(spec, activations.capture(model, params_a, inputs),
                                      activations.capture(model, params_b, inputs))

    per_shape = {}
    for batch in batches:
        shape = batch["image"].shape
        if shape not in per_shape:
            compiled = jax.jit(batch_stats).lower(params, params, batch).compile()
            per_shape[shape] = float(compiled.cost_analysis()["flops"])
    return sum(per_shape[batch["image"].shape] for batch in batches) / 1e9


def image_batches(model, images: int, batch: int, seed: int) -> list[dict]:
    """Random images in the model's input shape, ``images`` of them in batches of ``batch``."""
    import numpy as np

    c = model.config
    rng = np.random.default_rng(seed)
    return [{"image": rng.standard_normal((min(batch, images - start), c.image_size,
                                           c.image_size, c.num_channels), np.float32)}
            for start in range(0, images, batch)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench_fusion")
    parser.add_argument("--small", action="store_true", help="ViT-tiny shapes, to check quickly")
    parser.add_argument("--images", type=int, default=256, help="images for activation costs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    import jax

    from launch.bench import _best_seconds, matmul_rate
    from launch.main import print_figure
    from research import models, tree
    from research.fusion import activations
    from research.fusion.align import Options, align
    from research.fusion.matching import weight_matching
    from research.fusion.spec import spec_for

    load = os.getloadavg()[0]
    matmul, matmul_flops = matmul_rate()
    model_name = MODELS["small" if args.small else "full"]
    model = models.build(model_name)
    spec = spec_for(model)
    params_a, params_b = (model.init(jax.random.key(args.seed + i)) for i in range(2))
    batches = image_batches(model, args.images, args.batch, args.seed)
    by_activations, by_weights = Options(cost="activations"), Options()
    methods = {
        "activation_ot": run_method(
            "activation_ot", lambda stats: align(spec, params_a, params_b, by_activations, stats),
            spec, params_a, params_b,
            lambda: activations.collect(spec, model, params_a, model, params_b, batches)),
        "weight_ot": run_method(
            "weight_ot", lambda _: align(spec, params_a, params_b, by_weights),
            spec, params_a, params_b),
        "weight_matching": run_method(
            "weight_matching", lambda _: weight_matching(spec, params_a, params_b,
                                                         seed=args.seed),
            spec, params_a, params_b),
    }

    print_figure("backend", jax.default_backend())
    print_figure("cpu_count", os.cpu_count())
    print_figure("load_average_1min_at_start", load, ".2f")
    matmul_gflops = matmul_flops / _best_seconds(matmul, 3) / 1e9
    gflop = collect_gflop(spec, model, params_a, batches)
    print_figure("matmul_gflops", matmul_gflops, ".1f")
    print_figure("model", model_name)
    print_figure("params_per_model", tree.count(params_a))
    print_figure("images", args.images)
    print_figure("batch", args.batch)
    print_figure("ot_solver", f"{by_weights.solver}(epsilon={by_weights.epsilon})")
    print_figure("ot_residual", by_weights.residual)
    print_figure("activation_ot/collect_gflop", gflop, ".1f")
    print_figure("activation_ot/collect_s_at_matmul_rate", gflop / matmul_gflops, ".2f")
    for method, figures in methods.items():
        for key, value in figures.items():
            print_figure(f"{method}/{key}", value, ".2f")
    print_figure("fusion/total_s", methods["activation_ot"]["total_s"], ".2f")
    return 0


if __name__ == "__main__":
    sys.exit(main())
