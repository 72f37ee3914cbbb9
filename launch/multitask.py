"""Multi-task training of a method with per-task parts (``polyhistor``, ``shared_adapter``): one
run, one state, the tasks' training batches in turn.

    python -m launch.multitask --config configs/minilm_polyhistor.py --workdir runs/polyhistor
    python -m launch.multitask --config configs/minilm_shared_adapter.py:quick --workdir ...
    python -m launch.multitask ... --config.train.steps=100   (any config key, as launch.main)

``config.method.tasks`` names the tasks' datasets (``config.data.name`` is not read). The loop
trains one dataset per run, so each task gets its own view of the run, the config with
``data.name`` and ``method.task`` set to the task, and the loop's public pieces build its setup,
train and eval steps and training stream; the views share one state, whose shapes do not depend
on the task (the method picks the task's embedding and head from ``method.task``). Step ``i``
trains task ``i mod T`` on that task's next batch, so ``config.train.steps`` counts every task's
steps and the schedule runs over all of them. The shared leaves learn from every task; a task's
own leaves (its embedding, its head) get gradients from its steps only, though AdamW still moves
them on the others' steps (momentum and weight decay act on every trainable leaf).

Training logs ``train/TASK/loss`` (and accuracy) to ``metrics.jsonl`` every
``config.train.log_every`` steps; a non-finite step then stops the run (exit status 1), unless
``config.train.nonfinite='skip'``, which counts it (the step changed nothing). At the end every
task is evaluated on ``config.train.final_eval_splits`` (lines ``TASK/SPLIT/accuracy=...``), the
state is saved as the run's one checkpoint, and ``method.json`` records the first task's method,
so ``init_from`` and the exporters read the run as the first task's model (the method with
another ``task`` exports the others). No resume: a rerun starts over.
"""

from __future__ import annotations

import os
import sys

from launch.main import Parser, print_figure, run_command


def task_configs(config) -> dict:
    """``{task: the run's config for that task}``."""
    tasks = tuple(config.method.get("tasks") or ())
    if not tasks:
        raise ValueError(f"config.method.tasks is empty: launch.multitask trains a method's tasks "
                         f"(polyhistor, shared_adapter), not {config.method.get('name')!r}")
    views = {}
    for task in tasks:
        view = config.copy_and_resolve_references()
        with view.unlocked():
            view.data.name = task
            view.method.task = task
        views[task] = view
    return views


def train(config, workdir: str) -> dict:
    """Train every task of ``config.method.tasks`` in turn in ``workdir``; returns each task's
    final evaluation as ``{TASK/SPLIT/METRIC: value}``."""
    import jax
    import jax.numpy as jnp

    from research.train import checkpoint, loop, tasks as tasks_lib
    from research.train.metrics import MetricWriter

    views = task_configs(config)
    names = list(views)
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ValueError(f"workdir {workdir!r} already holds a run's checkpoints; launch.multitask "
                         f"does not resume: give a new workdir")
    model = loop.build_model(config)
    total = int(config.train.steps)
    setups = {name: loop.make_setup(view, model, total) for name, view in views.items()}
    state = loop.init_state(views[names[0]], setups[names[0]])
    grad_accum = int(config.train.get("grad_accum", 1))
    rng_impl = config.train.get("rng_impl", "unsafe_rbg")
    steps = {name: loop.make_train_step(setup, grad_accum, rng_impl)
             for name, setup in setups.items()}
    streams = {name: iter(loop.make_loader(view, "train", training=True,
                                           batch_size=view.train.batch_size))
               for name, view in views.items()}
    writer = MetricWriter(workdir, tensorboard=config.train.get("tensorboard", True))
    log_every = int(config.train.get("log_every", 10))
    windows, first = {}, 1  # the window's sums by task, and its first step
    for step in range(total):
        name = names[step % len(names)]
        state, sums = steps[name](state, loop.global_batch(setups[name], next(streams[name])))
        windows[name] = sums if name not in windows else jax.tree.map(jnp.add, windows[name],
                                                                       sums)
        if (step + 1) % log_every == 0 or step + 1 == total:
            logged = {}
            for task, window in windows.items():
                means = tasks_lib.means(window)
                logged.update({f"train/{task}/{key}": value for key, value in means.items()
                               if key != "nonfinite"})
                # A step with a non-finite loss changed nothing (the loop's step skips it).
                logged[f"train/{task}/skipped_steps"] = float(window["nonfinite"])
            writer.write(step + 1, logged)
            bad = [task for task, window in windows.items() if window["nonfinite"]]
            if bad and config.train.get("nonfinite", "stop") == "stop":
                writer.close()
                raise loop.RunStopped(f"non-finite loss or gradients on task {bad[0]!r} in steps "
                                      f"{first}..{step + 1}; nothing was saved "
                                      f"(config.train.nonfinite='skip' skips such steps)")
            windows, first = {}, step + 2

    results = {}
    for name in names:
        eval_step = loop.make_eval_step(setups[name])
        for split in config.train.final_eval_splits:
            metrics = loop.evaluate(views[name], setups[name], eval_step, state, split)
            results.update({f"{name}/{key}": value for key, value in metrics.items()})
    writer.write(total, results)
    writer.close()
    manager = checkpoint.make_manager(workdir, keep=1, async_save=False)
    checkpoint.save(manager, total, state, None, force=True)
    manager.wait_until_finished()
    manager.close()
    loop.record_method(views[names[0]], workdir)
    return results


def run(spec: str, overrides: list, workdir: str) -> None:
    from research.train import config as config_lib

    for key, value in train(config_lib.load(spec, overrides), workdir).items():
        print_figure(key, value)


def main(argv=None) -> int:
    parser = Parser(prog="python -m launch.multitask", description=__doc__)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:args]")
    parser.add_argument("--workdir", required=True, help="metrics and the final checkpoint")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides look like --config.key=value)")
        overrides.append(item[len("--config."):])
    from research.train import loop

    try:
        return run_command(run, args.config, overrides, args.workdir)
    except loop.RunStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
