"""The transformer-fusion reproduction (Imfeld et al., 2024, "Transformer Fusion with Optimal
Transport"): two parents trained from different seeds, fused one-shot by optimal transport
against vanilla averaging and permutation matching (Ainsworth et al., 2023), the straight lines
between them, and a short fine-tune of each fused model.

    python -m launch.fusion_experiments --config configs/fusion_vit_mnist5k.py [--quick]
    python -m launch.fusion_experiments --config configs/fusion_bert_shakespeare.py [--quick]

The experiment config names the parents' training config and argument strings; each parent
trains in ``ROOT/NAME`` (``--root``, default ``runs/fusion``) unless it has finished there.
Then ``key=value`` lines, every figure on validation and test (choices are made on validation
only):

1. each parent and the vanilla average;
2. OT fusion one-shot for each variant (Sinkhorn's epsilon chosen per variant on validation),
   weight matching and activation matching; for the best OT variant, the residual policies and
   heads matched across against per head;
3. test figures along ``t -> (1 - t) A + t B`` for B as trained, aligned by the best OT variant
   and aligned by weight matching;
4. each fused model (vanilla, the best hard and soft OT variants, the best matching baseline)
   and the best parent fine-tuned for the config's steps in ``ROOT/<finetune dir>/LABEL``
   (finished fine-tunes are reused: delete that folder after retraining a parent);
5. last line: the headline variant's one-shot test figure over vanilla's.

``--quick`` uses the config's quick settings: parents from the quick training configs, a
sixteenth of each split, a few activation examples, two curve points and four fine-tune steps,
to check it end to end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NamedTuple

from launch.main import print_figure, trained

SPLITS = ("validation", "test")


class Experiment:
    """The parents' model, the loop's setup and jitted evaluation step, and the fusion spec."""

    def __init__(self, config, root: str):
        from research.fusion import spec as spec_lib
        from research.train import config as config_lib
        from research.train import loop

        self.config, self.root = config, root
        self.parent_config = config_lib.load(f"{config.parent}:{config.runs[0][1]}")
        if config.eval_shards > 1:  # evaluation and activations read one shard of each split
            with self.parent_config.unlocked():
                self.parent_config.data.options.update(shard_index=0,
                                                       shard_count=int(config.eval_shards))
        self.model = loop.build_model(self.parent_config)
        self.setup = loop.make_setup(self.parent_config, self.model,
                                     int(self.parent_config.train.steps))
        self.eval_step = loop.make_eval_step(self.setup)
        self.spec = spec_lib.spec_for(self.model)
        self.sign = 1.0 if config.select == "accuracy" else -1.0

    def evaluate(self, params, splits=SPLITS) -> dict:
        """``{split: {metric: value}}`` for the config's metrics."""
        from research.train import loop

        results = {}
        for split in splits:
            metrics = loop.evaluate_params(self.parent_config, self.setup, self.eval_step,
                                           params, split)
            results[split] = {m: metrics[f"{split}/{m}"] for m in self.config.metrics}
        return results

    def report(self, label: str, params, splits=SPLITS) -> dict:
        results = self.evaluate(params, splits)
        for split, metrics in results.items():
            for metric, value in metrics.items():
                print_figure(f"{self.config.name}/{label}/{split}_{metric}", value)
        return results

    def score(self, results: dict, split: str = "validation") -> float:
        """Higher is better: the selection metric, negated when it is a loss."""
        return self.sign * results[split][self.config.select]

    def activation_batches(self) -> list[dict]:
        """The first ``examples`` training examples (unshuffled), in full batches."""
        from research.train import loop

        size = int(self.config.activations.batch_size)
        count = int(self.config.activations.examples) // size
        batches = []
        for batch in loop.make_loader(self.parent_config, "train", training=False,
                                      batch_size=size):
            if len(batches) == count:
                break
            batches.append(dict(batch))
        return batches


def _finished_steps(workdir: str) -> int | None:
    from research.train import checkpoint

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    manager = checkpoint.make_manager(workdir)
    step = manager.latest_step()
    manager.close()
    return step


# ---------------------------------------------------------------------------------------------
# One-shot fusion
# ---------------------------------------------------------------------------------------------


class Aligned(NamedTuple):
    """B rewritten in A's bases by one alignment (``options`` None: not by ``align``), and the
    figures of its average with A."""
    label: str
    options: object
    b_aligned: dict
    results: dict


def _align(exp: Experiment, a: dict, b: dict, options, stats) -> dict:
    from research.fusion import align

    maps = align.align(exp.spec, a, b, options, stats if options.cost == "activations" else None)
    return align.apply_maps(exp.spec, maps, b)


def _fused(a: dict, b_aligned: dict) -> dict:
    from research import tree

    return tree.lerp(a, b_aligned, 0.5)


def one_shot(exp: Experiment, a: dict, b: dict, stats: dict) -> dict[str, Aligned]:
    """Every OT variant (epsilon chosen on validation) and both matching baselines."""
    import dataclasses

    from research.fusion import align, matching

    name = exp.config.name
    found = {}
    for variant, fields in exp.config.variants.to_dict().items():
        options = align.Options(**fields)
        epsilons = exp.config.epsilons if options.solver == "sinkhorn" else (options.epsilon,)
        tried = []
        for epsilon in epsilons:
            candidate = dataclasses.replace(options, epsilon=epsilon)
            start = time.perf_counter()
            b_aligned = _align(exp, a, b, candidate, stats)
            seconds = time.perf_counter() - start
            validation = exp.evaluate(_fused(a, b_aligned), ("validation",))
            if len(epsilons) > 1:
                print_figure(f"{name}/{variant}/epsilon_{epsilon:g}/validation_"
                             f"{exp.config.select}", validation["validation"][exp.config.select])
            tried.append((exp.score(validation), candidate, b_aligned, seconds))
        _, options, b_aligned, seconds = max(tried, key=lambda t: t[0])
        if options.solver == "sinkhorn":
            print_figure(f"{name}/{variant}/epsilon", f"{options.epsilon:g}")
        print_figure(f"{name}/{variant}/align_seconds", seconds, ".2f")
        found[variant] = Aligned(variant, options, b_aligned,
                                 exp.report(variant, _fused(a, b_aligned)))
    start = time.perf_counter()
    maps = matching.weight_matching(exp.spec, a, b)
    print_figure(f"{name}/weight_matching/align_seconds", time.perf_counter() - start, ".2f")
    b_aligned = align.apply_maps(exp.spec, maps, b)
    found["weight_matching"] = Aligned("weight_matching", None, b_aligned,
                                       exp.report("weight_matching", _fused(a, b_aligned)))
    b_aligned = _align(exp, a, b, matching.ACTIVATION_MATCHING, stats)
    found["activation_matching"] = Aligned(
        "activation_matching", matching.ACTIVATION_MATCHING, b_aligned,
        exp.report("activation_matching", _fused(a, b_aligned)))
    return found


def ablations(exp: Experiment, a: dict, b: dict, stats: dict, best: Aligned) -> None:
    """The best OT variant under each residual policy, and with heads kept in place."""
    import dataclasses

    for policy in exp.config.residual_policies:
        options = dataclasses.replace(best.options, residual=((".*", policy),))
        exp.report(f"ablation/{best.label}/residual_{policy}",
                   _fused(a, _align(exp, a, b, options, stats)))
    for heads in ("across", "per_head"):
        options = dataclasses.replace(best.options, heads=heads)
        exp.report(f"ablation/{best.label}/heads_{heads}",
                   _fused(a, _align(exp, a, b, options, stats)))


def curves(exp: Experiment, a: dict, ends: dict[str, dict]) -> None:
    """Test figures at evenly spaced points from A (t=0) to each end (t=1)."""
    import numpy as np

    from research import tree

    points = np.linspace(0.0, 1.0, int(exp.config.curve_points))
    print_figure(f"{exp.config.name}/curve/t", ",".join(f"{t:.1f}" for t in points))
    for label, end in ends.items():
        results = [exp.evaluate(tree.lerp(a, end, float(t)), ("test",))["test"] for t in points]
        for metric in exp.config.metrics:
            print_figure(f"{exp.config.name}/curve/{label}/test_{metric}",
                         ",".join(f"{r[metric]:.4f}" for r in results))


# ---------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------


def _save_params(workdir: str, params: dict) -> None:
    """A checkpoint holding ``params``, what ``config.model.init_from`` reads."""
    from research.train import checkpoint

    manager = checkpoint.make_manager(workdir, async_save=False)
    checkpoint.save(manager, 0, {"trainable": params, "frozen": {}}, None, force=True)
    manager.close()


def finetune(exp: Experiment, label: str, params: dict | None, source: str | None = None) -> dict:
    """``params`` (or the run at ``source``) fine-tuned with the config's fine-tune argument
    string in ``ROOT/<finetune dir>/label``; returns its figures."""
    from research.train import checkpoint
    from research.train import config as config_lib
    from research.train import loop

    workdir = os.path.join(exp.root, exp.config.finetune.dir, label)
    if source is None:
        source = os.path.join(workdir, "source")
        if _finished_steps(source) is None:
            _save_params(source, params)
    config = config_lib.load(f"{exp.config.parent}:{exp.config.finetune.arg}")
    config.model.init_from = source
    config.train.final_eval_splits = ()
    loop.train(config, os.path.join(workdir, "run"))
    return exp.report(f"finetuned/{label}",
                      checkpoint.final_params(os.path.join(workdir, "run")))


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def _best(exp: Experiment, candidates: list[Aligned]) -> Aligned:
    return max(candidates, key=lambda c: exp.score(c.results))


def run(config, root: str) -> None:
    from research.fusion import activations

    name = config.name
    exp = Experiment(config, root)
    parents = [trained(f"{config.parent}:{arg}", os.path.join(root, name))[1]
               for name, arg in config.runs]
    a, b = parents
    parent_results = {run_name: exp.report(f"parent/{run_name}", params)
                      for (run_name, _), params in zip(config.runs, parents)}
    vanilla = Aligned("vanilla", None, b, exp.report("vanilla", _fused(a, b)))

    start = time.perf_counter()
    stats = activations.collect(exp.spec, exp.model, a, exp.model, b, exp.activation_batches())
    print_figure(f"{name}/activation_seconds", time.perf_counter() - start, ".2f")
    found = one_shot(exp, a, b, stats)
    ot = [found[v] for v in config.variants]
    best = _best(exp, ot)
    hard = _best(exp, [c for c in ot if c.options.solver == "exact"])
    soft = _best(exp, [c for c in ot if c.options.solver == "sinkhorn"])
    matched = _best(exp, [found["weight_matching"], found["activation_matching"]])
    for role, chosen in (("best_ot", best), ("best_hard", hard), ("best_soft", soft),
                         ("best_matching", matched)):
        print_figure(f"{name}/{role}", chosen.label)
    ablations(exp, a, b, stats, best)

    curves(exp, a, {"vanilla": b, best.label: best.b_aligned,
                    "weight_matching": found["weight_matching"].b_aligned})

    best_parent = max(parent_results, key=lambda n: exp.score(parent_results[n]))
    print_figure(f"{name}/best_parent", best_parent)
    select = config.select
    parent_tests = [r["test"][select] for r in parent_results.values()]
    tuned = {"parent": finetune(exp, f"parent_{best_parent}", None,
                                os.path.join(root, best_parent))}
    for role, chosen in (("vanilla", vanilla), ("ot_hard", hard), ("ot_soft", soft),
                         ("matching", matched)):
        label = chosen.label if chosen.options is None or chosen.options.solver == "exact" \
            else f"{chosen.label}_eps{chosen.options.epsilon:g}"
        tuned[role] = finetune(exp, label, _fused(a, chosen.b_aligned))
    for role, results in tuned.items():
        test = results["test"][select]
        better = all(exp.sign * (test - p) > 0 for p in parent_tests)
        print_figure(f"{name}/finetuned_{role}/test_{select}_minus_best_parent",
                     test - parent_results[best_parent]["test"][select], "+.4f")
        print_figure(f"{name}/finetuned_{role}/better_than_both_parents", better)

    headline = found[config.headline].results["test"][select]
    print_figure(f"{name}/headline_ot_soft_over_vanilla",
                 headline / vanilla.results["test"][select])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.fusion_experiments")
    parser.add_argument("--config", required=True, help="configs/fusion_*.py[:args]")
    parser.add_argument("--root", default="runs/fusion", help="the parents' and fine-tunes' runs")
    parser.add_argument("--quick", action="store_true",
                        help="quick parents, few activation examples, 2-point curves")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from launch.main import run_command
    from research.train import config as config_lib

    spec = args.config
    if args.quick:
        spec += "," if ":" in spec else ":"
        spec += "quick"
    return run_command(run, config_lib.load(spec), args.root)


if __name__ == "__main__":
    sys.exit(main())
