"""FinerCut (Zhang et al., 2024, "FinerCut: Finer-grained Interpretable Layer Pruning for Large
Language Models"): every block's attention sublayer and its FFN sublayer are separate pruning
candidates. Greedily, one at a time, remove the candidate whose removal (with those already
removed) changes the model's output least on calibration data: the Jensen-Shannon divergence
between the original model's output probabilities and the pruned one's, averaged over the
predicted positions (the paper's criterion; its code compares final logits the same way).

AxFormer's accuracy-driven pruning (Nagarajan et al., 2020, "AxFormer: Accuracy-driven
Approximation of Transformers for Faster, Smaller and more Accurate NLP Models") ranks the same
removals by the task instead: ``criterion='loss'`` (calibration cross-entropy) or ``'error'``
(calibration error rate, ties broken by the loss), so a sublayer that hurts the task goes first.

A removed sublayer is skipped with its norm (``ModelConfig.removed_sublayers``) and owns no
params: :func:`prune` returns the smaller tree and the model that runs it. The search itself
runs the full model with the trial removals skipped by Flax method interception under a traced
switch, so one compiled forward serves every trial.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from research import models, sites
from research import tree as tree_lib
from research.models.layers import SUBLAYERS
from research.train import tasks

CRITERIA = ("js", "loss", "error")


@dataclasses.dataclass(frozen=True)
class Removal:
    """One greedy step: the sublayer removed, and the calibration metrics of the model without
    it and every earlier one (``js``: divergence from the original model's outputs)."""
    sublayer: str
    js: float
    loss: float
    error: float


def candidates(config) -> tuple[str, ...]:
    """Every sublayer of ``config``'s blocks that is still there, in block order."""
    return tuple(name for index in range(config.num_layers) for name in
                 (f"layer_{index}/{sublayer}" for sublayer in SUBLAYERS)
                 if name not in config.removed_sublayers)


def prune(params: dict, model, removed) -> tuple[dict, models.Model]:
    """``(smaller params, model)`` without the sublayers ``removed`` (names such as
    ``"layer_3/attn"``, ``"layer_5/mlp"``): the new model's config lists them in
    ``removed_sublayers``, and the params keep exactly the leaves it still has."""
    removed = tuple(removed)
    for name in removed:
        if name in model.config.removed_sublayers:
            raise ValueError(f"finercut.prune: sublayer {name!r} is already removed")
    order = {name: index for index, name in enumerate(candidates(
        dataclasses.replace(model.config, removed_sublayers=())))}
    gone = model.config.removed_sublayers + removed
    config = dataclasses.replace(model.config, removed_sublayers=gone)  # validates the names
    config = dataclasses.replace(config, removed_sublayers=tuple(sorted(gone, key=order.get)))
    smaller = models.make(model.family, model.head, config)
    flat = tree_lib.flatten(params)
    shapes = tree_lib.flatten(smaller.param_shapes())
    for path in shapes:
        if path not in flat:
            raise ValueError(f"finercut.prune: params lack {path!r}, which the model needs")
    return tree_lib.unflatten({path: flat[path] for path in shapes}), smaller


def _skipping(keep):
    """Flax interception that runs the model as if sublayer ``j`` of block ``i`` were removed
    wherever ``keep[i, j]`` is False: it adds nothing and its norm passes its input through.
    ``keep`` may be traced, so one compiled forward serves every trial removal."""
    def where(layer) -> bool:
        *_, block, name = ("", "", *layer.path)
        return (name.removesuffix("_norm") in SUBLAYERS
                and re.fullmatch(r"layer_\d+", block) is not None)

    def skip(call: sites.Call):
        *_, block, name = call.layer.path
        kept = keep[int(block.removeprefix("layer_")), SUBLAYERS.index(name.removesuffix("_norm"))]
        return jnp.where(kept, call.output(), call.args[0] if name.endswith("_norm") else 0)
    return sites.intercept(skip, where)


def _evaluators(model):
    """Jitted ``forward(params, keep, batch) -> logits`` and ``sums(logits, reference, batch)``
    (the summed divergence, loss, correct predictions and count)."""
    def forward(params, keep, batch):
        inputs, _ = tasks.model_inputs(model, batch, None, training=False)
        with _skipping(keep):
            return model.module.apply({"params": params}, **inputs, deterministic=True)

    def sums(logits, reference, batch):
        _, targets = tasks.model_inputs(model, batch, None, training=False)
        found = tasks.loss_sums(model, logits, targets)
        if model.task == "causal_lm":  # the positions loss_sums scores
            logits, reference = logits[:, :-1], reference[:, :-1]
        return {**found, "js": jnp.sum(_js(reference, logits) * targets["weight"])}
    return jax.jit(forward), jax.jit(sums)


def _js(reference, logits):
    """Jensen-Shannon divergence (nats) between the softmaxes, per position."""
    log_p, log_q = jax.nn.log_softmax(reference, -1), jax.nn.log_softmax(logits, -1)
    log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)
    return 0.5 * jnp.sum(jnp.exp(log_p) * (log_p - log_m) + jnp.exp(log_q) * (log_q - log_m), -1)


def finercut(model, params: dict, batches, *, count: int | None = None,
             ratio: float | None = None, criterion: str = "js",
             rules=((".*", True),)) -> list[Removal]:
    """The greedy removal order, ``count`` sublayers long (or ``ratio`` of the candidates).

    batches: calibration batches of the model's task (inputs and labels), as the loaders give.
    rules: ``(regex, True)`` rules over candidate names (``layer_{i}/attn``, ``layer_{i}/mlp``)
        choosing which may go; e.g. ``(("layer_0/.*", False), (".*", True))`` keeps block 0.
    Each step ranks every remaining candidate by ``criterion`` measured without it and the
    sublayers already removed, so the first ``k`` removals of a longer run are the run for ``k``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"finercut: criterion={criterion!r} is not one of {CRITERIA}")
    if model.task not in tasks.TASKS:
        raise ValueError(f"finercut: model {model.family}_{model.head} has no output "
                         f"distribution to compare (task {model.task!r})")
    chosen = tree_lib.resolve_rules(rules, candidates(model.config), default=False,
                                    what="finercut rule")
    pool = [name for name, value in chosen.items() if value is True]
    if (count is None) == (ratio is None):
        raise ValueError("finercut: give exactly one of count and ratio")
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"finercut: ratio={ratio!r} is outside (0, 1]")
        count = max(1, int(ratio * len(pool)))
    if not 1 <= count <= len(pool):
        raise ValueError(f"finercut: count={count!r} is outside [1, {len(pool)}] (the "
                         "candidate sublayers)")
    batches = [{key: np.asarray(value) for key, value in batch.items()} for batch in batches]
    forward, sums = _evaluators(model)
    everything = np.ones((model.config.num_layers, len(SUBLAYERS)), bool)
    references = [forward(params, everything, batch) for batch in batches]

    def measure(removed) -> dict:
        keep = everything.copy()
        for name in removed:
            block, sublayer = name.split("/")
            keep[int(block.removeprefix("layer_")), SUBLAYERS.index(sublayer)] = False
        totals = {"js": 0.0, "loss": 0.0, "correct": 0.0, "count": 0.0}
        for batch, reference in zip(batches, references):
            found = sums(forward(params, keep, batch), reference, batch)
            totals = {key: totals[key] + float(found[key]) for key in totals}
        weight = max(totals["count"], 1.0)
        return {"js": totals["js"] / weight, "loss": totals["loss"] / weight,
                "error": 1.0 - totals["correct"] / weight}

    key = {"js": lambda m: (m["js"],), "loss": lambda m: (m["loss"],),
           "error": lambda m: (m["error"], m["loss"])}[criterion]
    removals: list[Removal] = []
    for _ in range(count):
        done = [r.sublayer for r in removals]
        trials = {name: measure([*done, name]) for name in pool}
        best = min(pool, key=lambda name: key(trials[name]))  # first in block order on ties
        removals.append(Removal(best, **trials[best]))
        pool.remove(best)
    return removals
