"""LT-SFT end to end, and the composition of two tasks' sparse deltas (Ansell et al., 2022).

    python -m launch.lt_sft --root runs/lt_sft [--density 0.05] [--rounds 1] [--quick]
        [--finetuned sentiment=DIR,subjectivity=DIR]

For each task (``configs/minilm_lt_sft.py:task=...``): a full fine-tune in ``ROOT/TASK/full``
(or the finished run given by ``--finetuned``); then per round the top entries by |θ − θ0|
(the schedule ends at ``density``), saved as a mask file, and a ``sparse`` run from θ0 that
trains only those (the head trains whole) in ``ROOT/TASK/round_R``; the result is
``ROOT/TASK/delta.safetensors``. Finished runs are skipped. Then both deltas on one base:
each task read by its own head with its own delta alone, and with the other task's encoder
delta added (θ0 + φa + φb). Prints ``key=value``; the last line is the headline.
"""

from __future__ import annotations

import argparse
import os
import sys

from launch.main import print_figure

CONFIG = "configs/minilm_lt_sft.py"
TASKS = ("sentiment", "subjectivity")
HEAD = r"classifier/.*"
ENCODER = r"(?!classifier/).*"



def densities(density: float, rounds: int) -> list[float]:
    """Geometric schedule from 1 down to ``density`` over ``rounds`` rounds."""
    if rounds < 1:
        raise ValueError(f"lt_sft.rounds={rounds} is not a positive integer")
    return [density ** ((r + 1) / rounds) for r in range(rounds)]


def lt_sft(task, workdir: str, finetuned: str | None):
    """Run LT-SFT for ``task`` (a ``launch.merge_experiments.Task`` of CONFIG); returns the
    sparse delta and ``{name: test accuracy}``."""
    import jax

    from research import methods, tree
    from research.sparse import delta as delta_lib
    from research.sparse import masks
    from research.train import checkpoint, loop

    config, options = task.config, task.config.lt_sft
    masks.check_density(options.density, "lt_sft.density")
    base = jax.device_get(task.pretrained())
    if not finetuned:
        finetuned = os.path.join(workdir, "full")
        loop.train(config, finetuned)
    current = checkpoint.final_params(finetuned)
    scores = {"full": task.accuracy(current, "test")}
    for index, density in enumerate(densities(options.density, options.rounds), 1):
        round_dir = os.path.join(workdir, f"round_{index}")
        os.makedirs(round_dir, exist_ok=True)
        mask_path = os.path.join(round_dir, "mask.safetensors")
        if not os.path.exists(mask_path):
            mask = masks.top_k(tree.sub(current, base), density=density, rules=options.rules)
            delta_lib.save(delta_lib.from_mask(mask, base), mask_path)
        round_config = config.copy_and_resolve_references()
        round_config.method = dict(name="sparse", mask=mask_path, dense=options.dense)
        round_config.optim.learning_rate = options.sparse_lr
        loop.train(round_config, round_dir)
        method = methods.build(round_config.method)
        trained = checkpoint.final_params(round_dir)
        current = method.model_params(trained)
        scores[f"round_{index}"] = task.accuracy(current, "test")
    delta = method.sparse_delta(trained, base)
    delta_lib.save(delta, os.path.join(workdir, "delta.safetensors"))
    return delta, scores


def experiment(root: str, density: float, rounds: int, finetuned: dict, quick: bool) -> None:
    """LT-SFT for both tasks, then their composition; prints every figure."""
    from launch.merge_experiments import Task
    from research.sparse import delta as delta_lib

    tasks, deltas = {}, {}
    for name in TASKS:
        tasks[name] = Task(f"task={name},density={density},rounds={rounds}", quick, CONFIG)
        deltas[name], scores = lt_sft(tasks[name], os.path.join(root, name), finetuned.get(name))
        for key, value in scores.items():
            print_figure(f"lt_sft/{name}/{key}/test_accuracy", value)
        print_figure(f"lt_sft/{name}/density", deltas[name].select(ENCODER).density)
    base = tasks[TASKS[0]].pretrained()
    composed = {}
    for name, other in zip(TASKS, reversed(TASKS)):
        both = delta_lib.compose(deltas[name], deltas[other].select(ENCODER))
        composed[name] = tasks[name].accuracy(delta_lib.apply(base, both), "test")
        print_figure(f"compose/{name}/alone_test_accuracy",
                     tasks[name].accuracy(delta_lib.apply(base, deltas[name]), "test"))
        print_figure(f"compose/{name}/composed_test_accuracy", composed[name])
    print_figure("headline", "composed θ0+φ_sentiment+φ_subjectivity test accuracy: "
                 + ", ".join(f"{name} {value:.4f}" for name, value in composed.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.lt_sft")
    parser.add_argument("--root", default="runs/lt_sft")
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--finetuned", default="",
                        help="TASK=DIR,...: finished full fine-tunes to start from")
    parser.add_argument("--quick", action="store_true", help="quick configs, a smoke test")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    finetuned = dict(item.split("=", 1) for item in filter(None, args.finetuned.split(",")))
    unknown = set(finetuned) - set(TASKS)
    if unknown:
        parser.error(f"--finetuned names {sorted(unknown)}; tasks are {TASKS}")
    from launch.main import run_command

    return run_command(experiment, args.root, args.density, args.rounds, finetuned, args.quick)

if __name__ == "__main__":
    sys.exit(main())
