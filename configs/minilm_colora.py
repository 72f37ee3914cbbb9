"""CoLoRA (Park, Kim & Chun, 2024) on real pretrained MiniLM-L6 for rotten_tomatoes: the LoRA run
of ``minilm_lora.py`` with per-kernel ranks allocated by contribution. The ranks come from a file
the CLI writes first: 288 = rank 8 on each of the 36 encoder kernels (the uniform run's total),
at most 32 per kernel. The pooler keeps rank 8 outside the budget: next to the fresh classifier
its gradient is the largest, and it would otherwise take most of the budget.

    python -m launch.colora --config configs/minilm_lora.py --budget 288 --batches 4 \
        --max-rank 32 --config.method.targets="(('encoder/.*/kernel', 8),)" \
        --out runs/colora/targets.json
    python -m launch.main --config configs/minilm_colora.py --workdir runs/colora_r288
    python -m launch.main --config configs/minilm_colora.py:targets=PATH,quick ...

Each kernel keeps the uniform run's scale ``alpha / r = 16 / 8 = 2`` (alpha = 2·rank), so the
two runs differ only in where the rank goes.
"""

import os

from configs import common, minilm_lora
from research.lowrank import colora

SCALE = 2.0
POOLER = (r"pooler/kernel", 8)  # outside the budget, as in the uniform run
CLI = ("python -m launch.colora --config configs/minilm_lora.py --budget 288 --batches 4 "
       "--max-rank 32 --config.method.targets=\"(('encoder/.*/kernel', 8),)\" --out {}")


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, task="sentiment",
                            targets="runs/colora/targets.json")
    config = minilm_lora.get_config(f"task={args.task}" + (",quick" if args.quick else ""))
    if not os.path.isfile(args.targets):
        raise FileNotFoundError(f"CoLoRA targets file {args.targets!r} does not exist; run "
                                f"{CLI.format(args.targets)} first")
    targets = colora.read_targets(args.targets)
    config.method.targets = (*targets, POOLER)
    config.method.alpha_rules = tuple((pattern, SCALE * rank) for pattern, rank in targets
                                      if rank)
    return config
