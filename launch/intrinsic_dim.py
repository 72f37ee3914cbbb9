"""Intrinsic dimension of ViT-tiny on mnist5k (Li et al., 2018): train ``z`` in
``θ = θ0 + P·z`` for a sweep of ``d`` and report d90, the smallest ``d`` reaching 90% of full
training's test accuracy.

    python -m launch.intrinsic_dim --root runs/intrinsic_dim [--dims 100,1000] [--projection sparse]
    python -m launch.intrinsic_dim --root /tmp/intrinsic_dim_quick --quick

Every run is ``configs/vit_mnist5k.py`` (same steps, schedule, batches and initial ``θ0``),
trained in ``ROOT/full`` or ``ROOT/{projection}_d{d}_lr{lr}_seed{seed}``; finished runs are only
re-evaluated (the loop resumes from their final checkpoint). Prints ``full accuracy=...``, one
``d=... accuracy=...`` line per ``d`` and last ``d90=...``. ``--quick`` trains the quick config
(4 steps) at two small ``d``, to check the pipeline end to end.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

CONFIG = "configs/vit_mnist5k.py"
DIMS = (50, 100, 200, 400, 800, 1200, 1600, 3200)
QUICK_DIMS = (10, 100)
# Adam moves each coordinate of z by about the rate, so θ moves by ||P·Δz|| ≈ rate·sqrt(d)
# (P's columns have unit norm): the peak rate is LR_SCALE / sqrt(d), the same step in θ for
# every d. 4 was best of a few tried (rates 0.05-1 at d = 400 and 1600); it is far above
# full training's 1e-3.
LR_SCALE = 4.0
SHARE = 0.9


def run(root: str, name: str, quick: bool, method: dict | None, lr: float | None) -> float:
    from research.train import config as config_lib
    from research.train import loop

    config = config_lib.load(f"{CONFIG}:quick" if quick else CONFIG)
    config.unlock()
    if method is not None:
        config.method = method
        config.optim.learning_rate = lr
        config.optim.weight_decay = ()  # its rules name kernels, which no longer train
    results = loop.train(config, os.path.join(root, name))
    return results.get("test/accuracy", results.get("validation/accuracy"))


def d90(full: float, accuracies: dict[int, float], share: float = SHARE) -> int | None:
    """The smallest ``d`` whose accuracy reaches ``share`` of ``full`` (None: none does)."""
    return next((d for d in sorted(accuracies) if accuracies[d] >= share * full), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.intrinsic_dim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="one workdir per run below it")
    parser.add_argument("--dims", default=None, help=f"comma-separated d (default {DIMS})")
    parser.add_argument("--projection", default="fastfood", help="fastfood or sparse")
    parser.add_argument("--lr-scale", type=float, default=LR_SCALE,
                        help="z's peak rate is LR_SCALE / sqrt(d)")
    parser.add_argument("--seed", type=int, default=0, help="draws P")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        dims = (tuple(int(d) for d in args.dims.split(",")) if args.dims
                else QUICK_DIMS if args.quick else DIMS)
    except ValueError:
        parser.error(f"--dims={args.dims!r} is not a comma-separated list of integers")

    full = run(args.root, "full", args.quick, None, None)
    print(f"full accuracy={full:.4f}", flush=True)
    accuracies = {}
    for d in dims:
        method = dict(name="subspace", dim=d, projection=args.projection, seed=args.seed)
        lr = args.lr_scale / math.sqrt(d)
        try:
            name = f"{args.projection}_d{d}_lr{lr:.3g}_seed{args.seed}"
            accuracies[d] = run(args.root, name, args.quick, method, lr)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"d={d} accuracy={accuracies[d]:.4f} lr={lr:.3g}", flush=True)
    found = d90(full, accuracies)
    print(f"d90={found if found is not None else f'none (>{max(dims)})'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
