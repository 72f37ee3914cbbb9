"""Weight averages of fine-tunes of one pretrained model: soups, WiSE-FT and dataset soups.

* Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned models improves
  accuracy without increasing inference time". Fine-tunes that start from one pretrained model
  tend to lie in one low-loss basin, so their average is often better than each of them. The
  *uniform soup* averages all; the *greedy soup* adds ingredients in order of their own held-out
  score and keeps one only if the held-out score of the average strictly improves; the *learned
  soup* learns per-layer mixing coefficients by gradient descent on held-out data.
* Wortsman et al., 2022, "Robust fine-tuning of zero-shot models" (WiSE-FT): interpolate the
  zero-shot and the fine-tuned weights, ``(1 - alpha) * zero_shot + alpha * finetuned``.
* Liu et al., 2024, "POINTS: Improving your vision-language model with affordable strategies":
  *dataset soups* -- fine-tune on different data mixtures and soup the fine-tunes instead of
  searching for the one best mixture.

Every function takes plain parameter trees; averages are computed in float32 and cast back to
each leaf's dtype.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import tree

# A path's default learned-soup group: its prefix through the first ``layer_<i>`` component.
_LAYER = re.compile(r"^(.*?\blayer_\d+)(/|$)")


def _check_models(models: Sequence, what: str = "models") -> list:
    models = list(models)
    if not models:
        raise ValueError(f"{what} is empty: a soup needs at least one model")
    for index, model in enumerate(models[1:], 1):
        try:
            tree.check_same_structure(models[0], model)
        except ValueError as err:
            raise ValueError(f"{what}[{index}] does not match {what}[0]: {err}") from None
    return models


def uniform_soup(models: Sequence) -> dict:
    """The elementwise mean of ``models``."""
    flats = [tree.flatten(m) for m in _check_models(models)]
    return tree.unflatten({
        path: (sum(jnp.asarray(f[path], jnp.float32) for f in flats) / len(flats))
        .astype(jnp.asarray(leaf).dtype) for path, leaf in flats[0].items()})


def wise_ft(zero_shot, finetuned, alpha) -> dict:
    """``(1 - alpha) * zero_shot + alpha * finetuned``. ``alpha`` is a number in [0, 1] or
    ``(regex, alpha)`` rules over path names (first match wins; every path must match one, so
    end them with ``(".*", value)``)."""
    _check_models([zero_shot, finetuned], "wise_ft models")
    paths = list(tree.flatten(finetuned))
    if isinstance(alpha, numbers.Real):
        alphas = dict.fromkeys(paths, alpha)
    else:
        alphas = tree.resolve_rules(alpha, paths, what="wise_ft alpha rule")
    for path, value in alphas.items():
        if value is None:
            raise ValueError(f"wise_ft alpha rules match no rule for {path!r}; "
                             "end them with ('.*', alpha)")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"wise_ft alpha for {path!r} is {value}, expected a number in [0, 1]")
    flat_zero = tree.flatten(zero_shot)
    return tree.unflatten({
        path: (jnp.asarray(flat_zero[path], jnp.float32) * (1.0 - alphas[path])
               + jnp.asarray(leaf, jnp.float32) * alphas[path]).astype(jnp.asarray(leaf).dtype)
        for path, leaf in tree.flatten(finetuned).items()})


def greedy_soup(models: Sequence, score_fn: Callable[[dict], float]):
    """Wortsman et al.'s greedy soup. ``score_fn(params)`` is a held-out metric, higher better.

    Returns ``(soup, kept, log)``: ``kept`` are the kept ingredients' indices in the order they
    were added; ``log`` holds ``"individual"`` (each ingredient's own score, input order) and
    ``"steps"``, one ``(index, score of the soup with it, kept)`` per ingredient tried.
    """
    models = _check_models(models)
    individual = [float(score_fn(m)) for m in models]
    order = sorted(range(len(models)), key=lambda i: -individual[i])  # stable on ties
    kept, best = [order[0]], individual[order[0]]
    steps = [(order[0], best, True)]
    for index in order[1:]:
        score = float(score_fn(uniform_soup([models[i] for i in kept + [index]])))
        improves = score > best  # strictly: an equal score adds an ingredient for nothing
        steps.append((index, score, improves))
        if improves:
            kept, best = kept + [index], score
    soup = uniform_soup([models[i] for i in kept])
    return soup, kept, {"individual": individual, "steps": steps}


def layer_groups(params, layer_rules=()) -> dict[str, str]:
    """``{path: group}`` for the learned soup: the first ``(regex, group)`` rule that matches,
    else the path's prefix through its first ``layer_<i>`` component
    (``encoder/layer_3/attn/...`` -> ``encoder/layer_3``), else its top-level name."""
    paths = list(tree.flatten(params))
    chosen = tree.resolve_rules(layer_rules, paths, what="layer rule")
    groups = {}
    for path in paths:
        match = _LAYER.match(path)
        groups[path] = chosen[path] or (match.group(1) if match else path.split(tree.SEP)[0])
    return groups


def learned_soup(models: Sequence, loss_fn: Callable, batches: Sequence, *, steps: int = 100,
                 learning_rate: float = 0.05, layer_rules=()):
    """Wortsman et al.'s learned soup, per layer: each group of leaves (see :func:`layer_groups`)
    mixes the ingredients with ``softmax(logits[group])``, learned with Adam by minimising
    ``loss_fn(params, batch)`` over ``batches`` (held-out data, cycled for ``steps`` steps). The
    logits start at zero, so the search starts from the uniform soup.

    Returns ``(soup, coefficients)`` with ``coefficients[group]`` the mixing weights (sum 1).
    """
    models = _check_models(models)
    batches = list(batches)
    if not batches:
        raise ValueError("learned_soup batches is empty: it needs held-out data")
    if steps < 1 or learning_rate <= 0:
        raise ValueError(f"learned_soup needs steps >= 1 and learning_rate > 0, got "
                         f"steps={steps}, learning_rate={learning_rate}")
    groups = layer_groups(models[0], layer_rules)
    flats = [tree.flatten(m) for m in models]
    # The stack is an argument of the jitted step, not a closure: constants would be baked
    # into the compiled program, one copy per ingredient.
    stacked = {p: jnp.stack([jnp.asarray(f[p]) for f in flats]) for p in flats[0]}

    def mix(logits, stacked):
        weights = {g: jax.nn.softmax(v) for g, v in logits.items()}
        return tree.unflatten({
            path: jnp.tensordot(weights[groups[path]], stack.astype(jnp.float32), axes=1)
            .astype(stack.dtype) for path, stack in stacked.items()})

    tx = optax.adam(learning_rate)

    @jax.jit
    def step(logits, opt_state, stacked, batch):
        loss, grads = jax.value_and_grad(lambda l: loss_fn(mix(l, stacked), batch))(logits)
        updates, opt_state = tx.update(grads, opt_state, logits)
        return optax.apply_updates(logits, updates), opt_state, loss

    logits = {g: jnp.zeros((len(models),), jnp.float32) for g in sorted(set(groups.values()))}
    opt_state = tx.init(logits)
    for index in range(steps):
        logits, opt_state, _ = step(logits, opt_state, stacked, batches[index % len(batches)])
    coefficients = {g: np.asarray(jax.nn.softmax(v)) for g, v in logits.items()}
    return jax.jit(mix)(logits, stacked), coefficients


SOUPS = ("greedy", "uniform")


def dataset_soup(mixture_models: Sequence, *, soup: str = "greedy", score_fn=None):
    """POINTS' dataset soup: ``mixture_models`` are fine-tunes of one model on different data
    mixtures; soup them greedily on a held-out ``score_fn`` (Liu et al. keep a mixture's model
    only if it helps) or uniformly. Returns ``(soup, kept indices)``."""
    if soup not in SOUPS:
        raise ValueError(f"dataset_soup soup={soup!r} is not one of {SOUPS}")
    if soup == "uniform":
        models = _check_models(mixture_models, "mixture_models")
        return uniform_soup(models), list(range(len(models)))
    if score_fn is None:
        raise ValueError("dataset_soup soup='greedy' needs score_fn (a held-out metric)")
    result, kept, _ = greedy_soup(_check_models(mixture_models, "mixture_models"), score_fn)
    return result, kept
