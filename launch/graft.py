"""Skill localization by grafting (Panigrahi et al., 2023): learn the graft, round it, score it.

    python -m launch.graft --finetuned /work/runs/merge/sent_lr1e-4_s1 --workdir runs/graft
    python -m launch.graft ... --arg density=1e-4,lr=1e8,steps=100   (configs/minilm_graft.py)
    python -m launch.graft ... --quick   (4 steps; scored on a sixteenth of the split)

Trains ``configs/minilm_graft.py`` in WORKDIR (a finished run is not retrained), rounds γ = σ(S)
at 1/2, and prints ``key=value`` lines: the graft's entries and their fraction of all the model's
parameters (and of the graftable ones); the accuracy of θpre, θft and the graft on the split,
all three read by θft's classifier; the share of the fine-tuned gain recovered,
(acc_graft − acc_pre) / (acc_ft − acc_pre); and the graft saved as a sparse delta over the
shared starting point (MiniLM plus the fresh head every run starts from; the delta holds the
grafted entries and θft's whole head) at WORKDIR/graft.safetensors. The last line is the headline.
"""

from __future__ import annotations

import argparse
import os
import sys

from launch.main import print_figure

CONFIG = "configs/minilm_graft.py"
QUICK_SHARDS = 16



def _line(key: str, value) -> None:
    print_figure(key, value, ".6g")


def _evaluator(config, quick: bool):
    """``accuracy(params, split)`` for plain model params, and the params the run starts from."""
    from research.train import loop

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.method = dict(name="full")
        config.optim.trainable = ()
        if quick:
            config.data.options.update(shard_index=0, shard_count=QUICK_SHARDS)
    model = loop.build_model(config)
    setup = loop.make_setup(config, model, int(config.train.steps))
    eval_step = loop.make_eval_step(setup)

    def accuracy(params, split: str) -> float:
        metrics = loop.evaluate_params(config, setup, eval_step, params, split)
        return metrics[f"{split}/accuracy"]

    def start() -> dict:
        return loop.init_params(config, setup, loop.init_key(config))

    return accuracy, start


def run(finetuned: str, workdir: str, arg: str, split: str, quick: bool) -> None:
    import numpy as np

    from research import methods, tree
    from research.sparse import learned_masks, masks
    from research.train import checkpoint, loop
    from research.train import config as config_lib

    spec = ",".join(filter(None, [f"finetuned={finetuned}", arg, "quick" if quick else ""]))
    config = config_lib.load(f"{CONFIG}:{spec}", [])
    loop.train(config, workdir)

    method = methods.build(config.method)
    params = checkpoint.final_params(workdir)
    grafted, mask = method.binarise(params)
    pre = learned_masks.model_params(params)  # θpre with θft's head, as trained against
    finetuned_params = checkpoint.final_params(finetuned)
    graftable = sum(np.size(m) for m in tree.flatten(mask).values() if np.ndim(m))
    entries = masks.count(mask, pre)
    _line("graft/entries", entries)
    _line("graft/fraction", entries / tree.count(pre))
    _line("graft/fraction_of_graftable", entries / graftable)

    accuracy, start = _evaluator(config, quick)
    scores = {name: accuracy(p, split) for name, p in
              (("pre", pre), ("finetuned", finetuned_params), ("graft", grafted))}
    for name, value in scores.items():
        _line(f"{name}/{split}_accuracy", value)
    gain = scores["finetuned"] - scores["pre"]
    recovered = (scores["graft"] - scores["pre"]) / gain if gain else float("nan")
    _line("graft/gain_recovered", recovered)

    from research.sparse import delta as delta_lib

    head = tree.mask_from_patterns(list(method.head), pre)
    with_head = tree.unflatten({path: value if np.ndim(value) else bool(tree.flatten(head)[path])
                                for path, value in tree.flatten(mask).items()})
    sparse = delta_lib.difference(finetuned_params, start(), with_head)
    path = os.path.join(workdir, "graft.safetensors")
    delta_lib.save(sparse, path)
    _line("graft/delta_path", path)
    _line("graft/delta_entries", sparse.count)
    _line("graft/delta_bytes", os.path.getsize(path))
    _line("graft/headline", f"{entries} entries ({100 * entries / tree.count(pre):.4f}% of the "
                            f"parameters) recover {100 * recovered:.1f}% of the fine-tuned gain "
                            f"on {split} (pre {scores['pre']:.4f}, fine-tuned "
                            f"{scores['finetuned']:.4f}, graft {scores['graft']:.4f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.graft", description=__doc__)
    parser.add_argument("--finetuned", required=True, help="workdir of the fine-tuned run")
    parser.add_argument("--workdir", required=True, help="where the graft trains")
    parser.add_argument("--arg", default="", help=f"more of {CONFIG}'s argument string")
    parser.add_argument("--split", default="test")
    parser.add_argument("--quick", action="store_true",
                        help="the quick config, scored on a sixteenth of the split")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from launch.main import run_command

    return run_command(run, args.finetuned, args.workdir, args.arg, args.split, args.quick)

if __name__ == "__main__":
    sys.exit(main())
