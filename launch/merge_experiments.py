"""The merging experiments: train the ingredients, then merge them and evaluate.

    python -m launch.merge_experiments --root runs/merge [--train-only | --eval-only] [--quick]

Every ingredient is ``configs/minilm_soup.py`` with the argument string below, trained in
``ROOT/NAME`` (finished runs are skipped: the loop resumes from their final checkpoint).

The evaluation restores each run's final checkpoint and prints ``key=value`` lines, accuracies
from the training loop's own evaluation, in four sections, each ending with a headline line:

* ``soup/``: the SOUP runs alone (validation, test), the uniform soup, the greedy soup (chosen on
  validation), the learned soup (per-layer coefficients learned on validation), uniform soups of
  the k best ingredients by validation, and the best single model (Wortsman et al. 2022).
* ``points/``: the MIXTURES runs alone and their dataset soups (Liu et al. 2024).
* ``two_task/``: the sentiment run TWO_TASK[0] and the subjectivity run TWO_TASK[1]: their
  encoders (everything but the classifier head) merged against the pretrained MiniLM by task
  arithmetic, TIES, DARE-TIES and Fisher averaging (also with each Fisher scaled to mean 1);
  each task read by its own head, on test.
* ``portllm/``: the sentiment delta moved onto the further-trained base (the subjectivity run's
  encoder), against that base alone and the original sentiment fine-tune (Khan et al. 2024).

``--quick`` evaluates runs trained with the quick configs (``NAME:ARG,quick``) on a sixteenth of
each split, to check the stage end to end in minutes.
"""

from __future__ import annotations

import argparse
import os
import sys

from launch.main import print_figure

CONFIG = "configs/minilm_soup.py"
SOUP = {f"sent_lr{lr}_s{seed}": f"lr={lr},seed={seed}"
        for lr in ("3e-5", "1e-4", "2e-4") for seed in (1, 2)}
MIXTURES = {f"mix{i}of3": f"shard={i},shards=3,steps=100" for i in range(3)}
SUBJECTIVITY = {"subj": "task=subjectivity"}
RUNS = {**SOUP, **SUBJECTIVITY, **MIXTURES}

SPLITS = ("validation", "test")
SECTIONS = ("soup", "points", "two_task", "portllm")
HEAD = r"classifier/.*"
TWO_TASK = ("sent_lr1e-4_s1", "subj")
# Settings as the papers and mergekit's examples use them; every delta at full weight.
MERGES = {"task_arithmetic": dict(weight=1.0),
          "ties": dict(weight=1.0, density=0.5),
          "dare_ties": dict(weight=1.0, density=0.5)}
LEARNED_SOUP = dict(epochs=2, learning_rate=0.05)
# Per-example gradients of MiniLM (a dense word-embedding gradient each) cost about a second
# per example on 2 CPU cores, so the Fisher reads a few hundred training examples.
FISHER_EXAMPLES, QUICK_FISHER_EXAMPLES = 256, 16
QUICK_SHARDS = 16


def train_all(root: str) -> None:
    from research.train import config as config_lib
    from research.train import loop

    for name, arg in RUNS.items():
        workdir = os.path.join(root, name)
        print(f"--- {name}: {CONFIG}:{arg}", flush=True)
        loop.train(config_lib.load(f"{CONFIG}:{arg}", []), workdir)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


class Task:
    """One task's model, the loop's setup and jitted evaluation step, and its data."""

    def __init__(self, arg: str, quick: bool, config_file: str = CONFIG):
        from research.train import config as config_lib
        from research.train import loop

        self.config = config_lib.load(f"{config_file}:{arg}{',quick' if quick else ''}", [])
        if quick:
            with self.config.unlocked():
                self.config.data.options.update(shard_index=0, shard_count=QUICK_SHARDS)
        self.quick = quick
        self.model = loop.build_model(self.config)
        self.setup = loop.make_setup(self.config, self.model, int(self.config.train.steps))
        self.eval_step = loop.make_eval_step(self.setup)

    def restore(self, root: str, name: str) -> dict:
        """The final params of the finished run ``root/name`` (one of RUNS)."""
        from research import tree
        from research.train import checkpoint
        from research.train import config as config_lib

        workdir = os.path.join(root, name)
        manager = checkpoint.make_manager(workdir)
        restored = checkpoint.restore_latest(manager, self.setup.abstract_state)
        manager.close()
        quick = ",quick" if self.quick else ""
        steps = int(config_lib.load(f"{CONFIG}:{RUNS[name]}{quick}", []).train.steps)
        if restored is None or restored[0] != steps:
            raise FileNotFoundError(f"run {workdir} has not finished its {steps} steps "
                                    "(train it first: python -m launch.merge_experiments)")
        state = restored[1]
        return tree.combine(state["trainable"], state["frozen"])

    def pretrained(self) -> dict:
        """The params every run started from: MiniLM plus the shared head init."""
        from research.train import loop

        return loop.init_params(self.config, self.setup, loop.init_key(self.config))

    def accuracy(self, params, split: str) -> float:
        from research.train import loop

        metrics = loop.evaluate_params(self.config, self.setup, self.eval_step, params, split)
        return metrics[f"{split}/accuracy"]

    def batches(self, split: str, limit: int | None = None) -> list[dict]:
        """Full-size evaluation batches of ``split`` (the short last one dropped: one shape, one
        compile), the first ``limit`` examples at most."""
        from research.train import loop

        size = int(self.config.train.eval_batch_size)
        if limit is not None:
            size = min(size, limit)
        kept = []
        for batch in loop.make_loader(self.config, split, training=False, batch_size=size):
            if limit is not None and len(kept) * size >= limit:
                break
            if len(batch["label"]) == size:
                kept.append(dict(batch))
        return kept

    def loss(self, params, batch):
        """Mean cross-entropy of ``params`` on ``batch`` (differentiable)."""
        from research.train import tasks

        inputs, targets = tasks.model_inputs(self.model, batch, None, training=False)
        logits = self.model.module.apply({"params": params}, **inputs, deterministic=True)
        sums = tasks.loss_sums(self.model, logits, targets)
        return sums["loss"] / sums["count"]

    def log_probs(self, params, batch):
        import jax

        inputs = {k: batch[k] for k in self.model.module.input_names if k in batch}
        logits = self.model.module.apply({"params": params}, **inputs, deterministic=True)
        return jax.nn.log_softmax(logits)



def _split_head(params) -> tuple[dict, dict]:
    """``(encoder, head)``: the classifier head and everything else."""
    from research import tree

    return tree.split(params, tree.mask_from_patterns([HEAD], params, what="head pattern"))[::-1]


def soup_section(task: Task, root: str) -> None:
    from research.merge import soups

    names = list(SOUP)
    models = [task.restore(root, name) for name in names]
    scores = {split: [task.accuracy(m, split) for m in models] for split in SPLITS}
    for index, name in enumerate(names):
        for split in SPLITS:
            print_figure(f"soup/{name}/{split}_accuracy", scores[split][index])

    def validation(params):  # ingredients' scores are known; soups are evaluated
        known = [i for i, m in enumerate(models) if m is params]
        return scores["validation"][known[0]] if known else task.accuracy(params, "validation")

    uniform = soups.uniform_soup(models)
    greedy, kept, log = soups.greedy_soup(models, validation)
    for index, score, was_kept in log["steps"][1:]:
        print_figure(f"soup/greedy/tried_{names[index]}", f"{score:.4f} kept={was_kept}")
    print_figure("soup/greedy/kept", ",".join(names[i] for i in kept))
    batches = task.batches("validation")
    learned, coefficients = soups.learned_soup(
        models, task.loss, batches, steps=max(1, LEARNED_SOUP["epochs"] * len(batches)),
        learning_rate=LEARNED_SOUP["learning_rate"])
    for group, weights in coefficients.items():
        print_figure(f"soup/learned/coefficients/{group}", ",".join(f"{w:.3f}" for w in weights))
    # The greedy soup's validation score is the last one it kept.
    known = {("greedy", "validation"): max(score for _, score, was_kept in log["steps"]
                                           if was_kept)}
    test = {}
    for name, params in {"uniform": uniform, "greedy": greedy, "learned": learned}.items():
        accuracies = {split: known[name, split] if (name, split) in known
                      else task.accuracy(params, split) for split in SPLITS}
        for split, accuracy in accuracies.items():
            print_figure(f"soup/{name}/{split}_accuracy", accuracy)
        test[name] = accuracies["test"]
    # Accuracy against the number of ingredients: uniform soups of the k best on validation.
    order = sorted(range(len(models)), key=lambda i: -scores["validation"][i])
    for k in range(1, len(models) + 1):
        accuracy = (scores["test"][order[0]] if k == 1 else test["uniform"] if k == len(models)
                    else task.accuracy(soups.uniform_soup([models[i] for i in order[:k]]),
                                       "test"))
        print_figure(f"soup/uniform_top{k}/test_accuracy", accuracy)
    best = max(range(len(models)), key=lambda i: scores["test"][i])
    print_figure("soup/best_single/name", names[best])
    print_figure("soup/best_single/test_accuracy", scores["test"][best])
    print_figure("soup/best_on_validation/test_accuracy", scores["test"][order[0]])
    print_figure("soup/headline", f"test accuracy: best single {scores['test'][best]:.4f}, "
                 f"uniform {test['uniform']:.4f}, greedy {test['greedy']:.4f}, "
                 f"learned {test['learned']:.4f}")


def points_section(task: Task, root: str) -> None:
    from research.merge import soups

    names = list(MIXTURES)
    models = [task.restore(root, name) for name in names]
    test = [task.accuracy(m, "test") for m in models]
    for name, accuracy in zip(names, test):
        print_figure(f"points/{name}/test_accuracy", accuracy)
    results = {}
    for kind in soups.SOUPS:
        soup, kept = soups.dataset_soup(
            models, soup=kind, score_fn=lambda p: task.accuracy(p, "validation"))
        results[kind] = task.accuracy(soup, "test")
        print_figure(f"points/dataset_soup_{kind}/kept", ",".join(names[i] for i in kept))
        print_figure(f"points/dataset_soup_{kind}/test_accuracy", results[kind])
    print_figure("points/headline", f"test accuracy: best mixture {max(test):.4f}, dataset "
                 f"soup greedy {results['greedy']:.4f}, uniform {results['uniform']:.4f}")


def _merged_encoders(tasks: list[Task], models: list[dict], base: dict) -> dict[str, dict]:
    """``{method: merged encoder}`` of the models' encoders against the base's."""
    from research import tree
    from research.merge import fisher, trees

    encoders = [_split_head(m)[0] for m in models]
    base_encoder = _split_head(base)[0]
    merged = {method: trees.merge(method, encoders, base_encoder,
                                  parameters=parameters, seed=0)
              for method, parameters in MERGES.items()}
    # Each model's Fisher on its own task's training inputs, read through its own head. The
    # tasks share one architecture, so one log-probability function serves both: one compile.
    examples = QUICK_FISHER_EXAMPLES if tasks[0].quick else FISHER_EXAMPLES
    fishers = [_split_head(fisher.diagonal_fisher(
        tasks[0].log_probs, model, task.batches("train", examples)))[0]
        for task, model in zip(tasks, models)]
    merged["fisher"] = fisher.fisher_merge(encoders, fishers)
    # A confident model has a small Fisher everywhere, so the raw merge follows the less
    # confident one; scaled to mean 1, each Fisher only says where its model is sensitive.
    totals = [sum(float(leaf.sum()) for leaf in tree.flatten(f).values()) / tree.count(f)
              for f in fishers]
    for total, name in zip(totals, TWO_TASK):
        print_figure(f"two_task/fisher/{name}_mean_fisher", f"{total:.3e}")
    merged["fisher_mean1"] = fisher.fisher_merge(
        encoders, [tree.scale(f, 1.0 / t) for f, t in zip(fishers, totals)])
    return merged


def two_task_section(tasks: list[Task], root: str, base: dict) -> None:
    from research import tree

    models = [task.restore(root, name) for task, name in zip(tasks, TWO_TASK)]
    heads = [_split_head(m)[1] for m in models]
    encoders = {"pretrained": _split_head(base)[0],
                **{f"{name}_alone": _split_head(m)[0] for name, m in zip(TWO_TASK, models)},
                **_merged_encoders(tasks, models, base)}
    summary = []
    for method, encoder in encoders.items():
        scores = [task.accuracy(tree.combine(encoder, head), "test")
                  for task, head in zip(tasks, heads)]
        for name, accuracy in zip(TWO_TASK, scores):
            print_figure(f"two_task/{method}/{name}_test_accuracy", accuracy)
        summary.append(f"{method} {scores[0]:.4f}/{scores[1]:.4f}")
    print_figure("two_task/headline", f"test accuracy {'/'.join(TWO_TASK)}: " + ", ".join(summary))


def portllm_section(tasks: list[Task], root: str, base: dict) -> None:
    from research import tree
    from research.merge import portllm

    sentiment, subjectivity = tasks
    tuned = sentiment.restore(root, TWO_TASK[0])
    new_encoder = _split_head(subjectivity.restore(root, TWO_TASK[1]))[0]
    initial_head, tuned_head = _split_head(base)[1], _split_head(tuned)[1]
    patch = portllm.patch_from_finetune(tuned, base)
    # The patch carries the head's delta from its init, so it lands on the init head.
    results = {"new_base": tree.combine(new_encoder, tuned_head),
               "ported": portllm.port(tree.combine(new_encoder, initial_head), patch),
               "original": tuned}
    test = {name: sentiment.accuracy(params, "test") for name, params in results.items()}
    for name, accuracy in test.items():
        print_figure(f"portllm/{name}/{TWO_TASK[0]}_test_accuracy", accuracy)
    print_figure("portllm/headline", f"{TWO_TASK[0]} test accuracy: new base alone "
                 f"{test['new_base']:.4f}, ported patch {test['ported']:.4f}, original fine-tune "
                 f"{test['original']:.4f}")


def evaluate_all(root: str, sections=SECTIONS, quick: bool = False) -> None:
    sentiment = Task(SOUP[TWO_TASK[0]], quick)
    if "soup" in sections:
        soup_section(sentiment, root)
    if "points" in sections:
        points_section(sentiment, root)
    if {"two_task", "portllm"} & set(sections):
        tasks = [sentiment, Task(SUBJECTIVITY[TWO_TASK[1]], quick)]
        base = sentiment.pretrained()
        if "two_task" in sections:
            two_task_section(tasks, root, base)
        if "portllm" in sections:
            portllm_section(tasks, root, base)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.merge_experiments")
    parser.add_argument("--root", default="runs/merge")
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument("--train-only", action="store_true")
    stage.add_argument("--eval-only", action="store_true")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true",
                        help="evaluate quick-config runs on a sixteenth of each split")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick and not args.eval_only:
        parser.error("--quick evaluates quick runs; it needs --eval-only")
    if not args.eval_only:
        train_all(args.root)
    if not args.train_only:
        from launch.main import run_command

        return run_command(evaluate_all, args.root, args.sections, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
