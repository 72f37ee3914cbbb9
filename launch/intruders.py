"""Count intruder dimensions of fine-tuned runs against their pretrained base.

    python -m launch.intruders --config configs/minilm_lora.py --workdir runs/lora_r8 \
        [--config.key=value ...] [--k 10] [--epsilon 0.5 [0.7 ...]]

Restores the run's newest checkpoint with the same config it trained with, folds any LoRA
factors into the base (so LoRA and full fine-tuning are compared as plain weight matrices), and
compares every encoder kernel with the pretrained one (Shuttleworth et al., "LoRA vs Full
Fine-tuning: an Illusion of Equivalence"). Prints ``key=value`` lines; the last is the total.
"""

from __future__ import annotations

import argparse
import sys

KERNELS = ((r"encoder/.*/kernel", True),)


def run_params(config, workdir: str):
    """``(pretrained params, fine-tuned params with any LoRA merged)`` of a finished run."""
    from research import tree
    from research.models import hf
    from research.train import checkpoint, loop

    model = loop.build_model(config)
    setup = loop.make_setup(config, model, int(config.train.steps))
    manager = checkpoint.make_manager(workdir)
    restored = checkpoint.restore_latest(manager, setup.abstract_state)
    manager.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    _, state, _ = restored
    tuned = tree.combine(state["trainable"], state["frozen"])
    tuned = setup.method.export(tuned)  # LoRA and DoRA merged into their kernels
    _, base = hf.load_pretrained(config.model.pretrained, model=model)
    return base, tuned


def main(argv=None) -> int:
    from launch.main import USER_ERRORS, parse_args

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--epsilon", type=float, nargs="+", default=[0.5])
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(rest)

    from research.analysis import intruders
    from research.train import config as config_lib

    try:
        config = config_lib.load(args.config, overrides)
        base, tuned = run_params(config, args.workdir)
        counts = intruders.count_intruders(base, tuned, KERNELS, k=own.k,
                                           epsilon=own.epsilon[0])
    except USER_ERRORS as err:
        print(f"error: {err.args[0] if err.args else repr(err)}", file=sys.stderr)
        return 2
    for path, count in counts["per_path"].items():
        print(f"{path}={count}")
    print(f"matrices={counts['matrices']}")
    print(f"matrices_with_intruders={counts['with_intruders']}")
    lowest = min(float(sims.min()) for sims in counts["similarities"].values())
    print(f"lowest_max_similarity={lowest:.3f}")
    # A vector's highest similarity does not depend on epsilon, so every threshold is a count.
    for epsilon in own.epsilon[1:]:
        total = sum(int((sims < epsilon).sum()) for sims in counts["similarities"].values())
        print(f"total_intruders_epsilon_{epsilon:g}={total}")
    print(f"total_intruders={counts['total']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
