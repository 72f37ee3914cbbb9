"""Allocate LoRA ranks by contribution (CoLoRA) and write them as LoRA ``targets`` rules.

    python -m launch.colora --config configs/minilm_lora.py --budget 288 --batches 4 \
        --out runs/colora/targets.json [--min-rank 1] [--max-rank R] [--config.key=value ...]

The config must be a LoRA run: its ``targets`` rules name the candidate kernels (their ranks are
ignored). The model is built with its pretrained weights (a head the checkpoint lacks gets its
seeded init), each candidate is scored on ``--batches`` real training batches
(:func:`research.lowrank.colora.contribution`), the ``--budget`` is shared out in proportion
(each kernel's rank at most its smaller side and ``--max-rank``), and the rules are written
atomically. ``configs/minilm_colora.py`` reads them. Prints ``path=rank`` lines.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m launch.colora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a LoRA config: configs/NAME.py[:args]")
    parser.add_argument("--budget", type=int, required=True, help="total rank to share out")
    parser.add_argument("--batches", type=int, default=4, help="training batches to score on")
    parser.add_argument("--out", required=True, help="JSON file for the rules")
    parser.add_argument("--min-rank", type=int, default=1)
    parser.add_argument("--max-rank", type=int, default=0, help="0: each kernel's smaller side")
    args, rest = parser.parse_known_args(argv)
    bad = [item for item in rest if not item.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised argument {bad[0]!r} (overrides look like --config.key=value)")
    if args.batches < 1:
        parser.error(f"--batches={args.batches} must be at least 1")
    return args, [item[len("--config."):] for item in rest]


def score(config, batches: int) -> tuple[dict, dict]:
    """``({kernel path: contribution}, {kernel path: its smaller side})`` for the config's LoRA
    targets, on the first ``batches`` training batches."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from research import methods
    from research.lowrank import colora, lora
    from research.models import hf
    from research.train import loop, tasks

    method = methods.build(config.method)
    if not isinstance(method, lora.LoRA):
        raise ValueError(f"config.method.name={config.method.get('name')!r}: CoLoRA needs a "
                         f"'lora' config, whose targets name the candidate kernels")
    model = loop.build_model(config)
    rng = jax.random.key(config.seed)
    if config.model.get("pretrained"):
        model, params = hf.load_pretrained(config.model.pretrained, model=model, rng=rng)
    else:
        params = model.init(rng)
    plan = method.plan(params)
    sides = {path: min(math.prod(t.shape[:t.input_axes]), math.prod(t.shape[t.input_axes:]))
             for path, t in plan.items()}

    loader = iter(loop.make_loader(config, "train", training=True,
                                   batch_size=config.train.batch_size))
    taken = [next(loader) for _ in range(batches)]
    stacked = {k: np.stack([b[k] for b in taken]) for k in taken[0]}

    def loss_fn(params, batch):
        inputs, targets = tasks.model_inputs(model, batch, jax.random.key(0), training=False)
        sums = tasks.loss_sums(model, model.module.apply({"params": params}, **inputs), targets)
        return sums["loss"] / jnp.maximum(sums["count"], 1.0)

    contribution = jax.jit(functools.partial(colora.contribution, loss_fn,
                                             candidates=tuple(plan)))
    scores = jax.device_get(contribution(params, stacked))
    return {p: float(scores[p]) for p in plan}, sides


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from launch.main import USER_ERRORS
    from research.lowrank import colora
    from research.train import config as config_lib

    try:
        config = config_lib.load(args.config, overrides)
        scores, sides = score(config, args.batches)
        caps = {p: min(side, args.max_rank or side) for p, side in sides.items()}
        ranks = colora.allocate(scores, args.budget, min_rank=args.min_rank, max_rank=caps)
        colora.write(args.out, ranks, scores, config=args.config, overrides=overrides,
                     budget=args.budget, batches=args.batches, min_rank=args.min_rank,
                     max_rank=caps)
    except USER_ERRORS as err:
        print(f"error: {err.args[0] if err.args else repr(err)}", file=sys.stderr)
        return 2
    for path, rank in ranks.items():
        print(f"{path}={rank}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
