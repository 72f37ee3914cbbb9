"""The pruning experiments, printing ``key=value`` lines.

    python -m launch.prune vit [--root runs/prune] [--full-run DIR] [--sparse-arg ARG]
        [--scope global|leaf] [--quick]
    python -m launch.prune finercut [--merge-root runs/merge] [--criterion js] [--quick]

``vit``: the ViT of ``configs/vit_mnist5k.py`` (trained in ``--full-run``, default
``ROOT/vit_full``) and the same ViT trained with sparse regularisation
(``configs/vit_sparse_reg.py:ARG``, in ``ROOT/vit_sparse_reg[_ARG]``; ARG such as
``strength=1e-3`` or ``group``), each magnitude-pruned to each of DENSITIES (ranking all block
kernels together, or with ``--scope leaf`` each alone); test accuracy before and after. Sparse
then Prune (Prasetyo et al., 2023) expects the regularised model to lose less. Missing or
unfinished runs are trained first (about 45 s each on 2 CPU cores).

``finercut``: FinerCut (Zhang et al., 2024) on the sentiment MiniLM fine-tuned by
``launch.merge_experiments`` (``MERGE_ROOT/sent_lr1e-4_s1``): the greedy removal order over the
12 attention and FFN sublayers, calibrated on CALIBRATION validation examples; for each of
REMOVALS, which sublayers went, how many params, and the test accuracy of the smaller model.
``--criterion loss`` or ``error`` ranks removals by the calibration task instead (AxFormer).

``--quick`` trains the quick ViT configs (4 steps) and, for FinerCut, removes one sublayer with
32 calibration examples and scores a sixteenth of the test split: an end-to-end check.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from launch.main import print_figure, trained

DENSITIES = (0.5, 0.3, 0.1)
VIT_RUNS = {"full": "configs/vit_mnist5k.py", "sparse_reg": "configs/vit_sparse_reg.py"}
FINERCUT_RUN = "sent_lr1e-4_s1"
REMOVALS, CALIBRATION = (1, 2, 4), 256
QUICK_REMOVALS, QUICK_CALIBRATION = (1,), 32



def accuracy_fn(config, model):
    """``accuracy(params, split)`` of ``model`` under ``config``'s data and evaluation, compiled
    once per model."""
    from research.train import loop

    setup = loop.make_setup(config, model, int(config.train.steps))
    eval_step = loop.make_eval_step(setup)

    def accuracy(params, split: str) -> float:
        metrics = loop.evaluate_params(config, setup, eval_step, params, split)
        return metrics[f"{split}/accuracy"]
    return accuracy


def vit(root: str, full_run: str | None, sparse_arg: str, scope: str, quick: bool) -> None:
    import numpy as np

    from research import tree
    from research.sparse import prune
    from research.train import loop

    suffix = "_quick" if quick else ""
    sparse_name = "_".join(filter(None, ("vit_sparse_reg", re.sub(r"[^\w,]", "", sparse_arg))))
    workdirs = {"full": full_run or os.path.join(root, f"vit_full{suffix}"),
                "sparse_reg": os.path.join(root, sparse_name.replace(",", "_") + suffix)}
    args = {"full": "quick" if quick else "",
            "sparse_reg": ",".join(filter(None, (sparse_arg, "quick" if quick else "")))}
    accuracy = None
    for name, config_file in VIT_RUNS.items():
        config, params = trained(f"{config_file}:{args[name]}", workdirs[name])
        # Both runs are the same ViT, so one compiled evaluation serves them.
        accuracy = accuracy or accuracy_fn(config, loop.build_model(config))
        print_figure(f"vit/{name}/test_accuracy", accuracy(params, "test"))
        kernels = np.concatenate([np.abs(np.asarray(v)).ravel() for p, v in
                                  tree.flatten(params).items()
                                  if re.fullmatch(prune.BLOCK_KERNELS, p)])
        print_figure(f"vit/{name}/kernel_share_below_1e-3", float(np.mean(kernels < 1e-3)))
        for density in DENSITIES:
            pruned, _ = prune.magnitude_prune(params, prune.block_kernels(density), scope=scope)
            print_figure(f"vit/{name}/magnitude_d{density}/test_accuracy", accuracy(pruned, "test"))


def finercut(merge_root: str, criterion: str, quick: bool) -> None:
    from launch.merge_experiments import RUNS, Task
    from research import tree
    from research.sparse import finercut as finercut_lib
    from research.train import checkpoint

    task = Task(RUNS[FINERCUT_RUN], quick)
    workdir = os.path.join(merge_root, FINERCUT_RUN)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"no run in {workdir} (train it: python -m "
                                "launch.merge_experiments --train-only)")
    # The full run, also in quick mode (which only shrinks the data).
    params = checkpoint.final_params(workdir)
    removals = QUICK_REMOVALS if quick else REMOVALS
    calibration = task.batches("validation", QUICK_CALIBRATION if quick else CALIBRATION)
    order = finercut_lib.finercut(task.model, params, calibration, count=max(removals),
                                  criterion=criterion)
    total = tree.count(params)
    print_figure("finercut/params", total)
    print_figure("finercut/original/test_accuracy",
                 accuracy_fn(task.config, task.model)(params, "test"))
    for step in order:
        print_figure(f"finercut/order/{step.sublayer}",
                     f"js={step.js:.5f} loss={step.loss:.4f} error={step.error:.4f}")
    for count in removals:
        pruned, smaller = finercut_lib.prune(params, task.model,
                                             [s.sublayer for s in order[:count]])
        print_figure(f"finercut/k{count}/removed", ",".join(smaller.config.removed_sublayers))
        print_figure(f"finercut/k{count}/params_removed", total - tree.count(pruned))
        print_figure(f"finercut/k{count}/params_removed_share",
                     (total - tree.count(pruned)) / total)
        print_figure(f"finercut/k{count}/test_accuracy",
                     accuracy_fn(task.config, smaller)(pruned, "test"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("vit", "finercut"))
    parser.add_argument("--root", default="runs/prune", help="where the ViT runs live")
    parser.add_argument("--full-run", default=None, help="the vit_mnist5k run to prune")
    parser.add_argument("--sparse-arg", default="", help="argument of vit_sparse_reg.py")
    parser.add_argument("--scope", default="global", help="magnitude ranking: global or leaf")
    parser.add_argument("--merge-root", default="runs/merge")
    parser.add_argument("--criterion", default="js", help="FinerCut's: js, loss or error")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from launch.main import run_command

    if args.part == "vit":
        return run_command(vit, args.root, args.full_run, args.sparse_arg, args.scope,
                           args.quick)
    return run_command(finercut, args.merge_root, args.criterion, args.quick)

if __name__ == "__main__":
    sys.exit(main())
