"""Fisher merging (Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging"):
treat each model's posterior as a Gaussian whose precision is its diagonal Fisher information,
and merge to the joint mode, ``θ = Σ_i w_i F_i θ_i / Σ_i w_i F_i`` per parameter. Where a model
is confident about a parameter (large Fisher), the merge keeps its value.

The diagonal Fisher of a classifier ``p(y|x)`` is ``E_x E_{y~p(y|x)} (∂ log p(y|x) / ∂θ)²``,
estimated over data ``x`` with labels from the model itself, never the data's labels (that
"empirical Fisher" is a different quantity). ``estimator='exact'`` takes the inner expectation
over all classes, as the authors' code does for classifiers (``C`` backward passes per example);
``'sampled'`` draws one ``y`` per example (one backward pass, an unbiased estimate: for many
classes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from research import tree

ESTIMATORS = ("exact", "sampled")


def _per_example(log_probs_fn, estimator: str):
    """``(params, example, uniform) -> squared-gradient tree`` for one example (no batch
    axis); ``uniform`` in [0, 1) picks the sampled estimator's label."""

    def squared_grads(params, example, uniform):
        def log_probs(p):
            batch = jax.tree.map(lambda x: x[None], example)
            return log_probs_fn(p, batch)[0].astype(jnp.float32)

        values, vjp = jax.vjp(log_probs, params)
        classes = values.shape[-1]
        if estimator == "sampled":
            # Inverse-CDF draw from one uniform: cheaper to compile than a key per example.
            y = jnp.minimum(jnp.sum(jnp.cumsum(jnp.exp(values)) < uniform), classes - 1)
            return jax.tree.map(jnp.square, vjp(jax.nn.one_hot(y, classes))[0])
        grads = jax.vmap(vjp)(jnp.eye(classes))[0]  # leaves [classes, *shape]
        probs = jnp.exp(values)
        return jax.tree.map(lambda g: jnp.tensordot(probs, jnp.square(g), 1), grads)

    return squared_grads


def _batch_sums(log_probs_fn, estimator: str, chunk_size: int | None):
    """Jitted ``(params, batch, key) -> summed squared gradients over the batch``, vmapped over
    ``chunk_size`` examples at a time so only one chunk of per-example gradients is alive."""
    per_example = jax.vmap(_per_example(log_probs_fn, estimator), in_axes=(None, 0, 0))

    @jax.jit
    def sums(params, batch, key):
        rows = jax.tree.leaves(batch)[0].shape[0]
        chunk = min(chunk_size or rows, rows)
        chunks = -(-rows // chunk)
        # Pad by repeating the last example (always a valid input), then weight it 0.
        index = jnp.minimum(jnp.arange(chunks * chunk), rows - 1)
        split = lambda x: x.reshape(chunks, chunk, *x.shape[1:])  # noqa: E731
        xs = (jax.tree.map(lambda x: split(x[index]), batch),
              split(jax.random.uniform(key, (chunks * chunk,))),
              split(jnp.arange(chunks * chunk) < rows))

        def body(total, inputs):
            examples, uniforms, valid = inputs
            squares = per_example(params, examples, uniforms)
            keep = lambda s: valid.reshape(-1, *(1,) * (s.ndim - 1))  # noqa: E731
            return jax.tree.map(lambda t, s: t + jnp.sum(jnp.where(keep(s), s, 0.0), 0),
                                total, squares), None

        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return jax.lax.scan(body, zeros, xs)[0]

    return sums


def diagonal_fisher(log_probs_fn: Callable, params, batches: Iterable, *,
                    estimator: str = "exact", rng=None, chunk_size: int | None = 8) -> dict:
    """The diagonal Fisher of ``params`` (a float32 tree of the same structure), averaged over
    every example of ``batches``.

    log_probs_fn: ``(params, batch) -> [batch, classes]`` log-probabilities (for a Flax
        classifier: ``log_softmax`` of ``module.apply({"params": p}, **inputs)``, deterministic).
    batches: pytrees whose leaves share a leading example axis; labels in them are not read.
    estimator: 'exact' (expectation over classes) or 'sampled' (one ``y ~ p(y|x)`` per example,
        from ``rng``; default ``jax.random.key(0)``).
    chunk_size: examples whose per-example gradients are alive at once (None: a whole batch).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"diagonal_fisher estimator={estimator!r} is not one of {ESTIMATORS}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"diagonal_fisher chunk_size={chunk_size!r} is not a positive integer")
    rng = jax.random.key(0) if rng is None else rng
    sums = _batch_sums(log_probs_fn, estimator, chunk_size)
    total, count = None, 0
    for index, batch in enumerate(batches):
        rows = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
        if len(rows) != 1 or None in rows or 0 in rows:
            raise ValueError(f"diagonal_fisher batch {index}: leaves need one shared, non-empty "
                             f"leading example axis; got sizes {sorted(rows, key=str)}")
        batch_sums = sums(params, batch, jax.random.fold_in(rng, index))
        total = batch_sums if total is None else jax.tree.map(jnp.add, total, batch_sums)
        count += rows.pop()
    if not count:
        raise ValueError("diagonal_fisher got no batches")
    return jax.tree.map(lambda s: s / count, total)


def fisher_merge(models, fishers, *, weights=None, epsilon: float = 1e-8, rules=None) -> dict:
    """``Σ_i w_i F_i θ_i / Σ_i w_i F_i`` per parameter, each Fisher floored at ``epsilon`` (so
    where every Fisher vanishes the merge is the ``w``-weighted average).

    weights: one non-negative number per model (default equal). rules: ``(regex, bool)`` over
    the paths, first match wins: True paths are merged, the rest (and paths no rule matches)
    are taken from the first model. Default: every path is merged. ``fishers`` need only hold
    the merged paths.
    """
    if not models or len(fishers) != len(models):
        raise ValueError(f"fisher_merge needs one Fisher per model; got {len(models)} models "
                         f"and {len(fishers)} Fishers")
    weights = [1.0] * len(models) if weights is None else list(weights)
    if len(weights) != len(models) or min(weights) < 0 or not sum(weights) > 0:
        raise ValueError(f"fisher_merge weights={weights!r}: expected {len(models)} non-negative "
                         f"numbers with a positive sum")
    if not epsilon > 0:
        raise ValueError(f"fisher_merge epsilon={epsilon!r} must be positive")
    for other in models[1:]:
        tree.check_same_structure(models[0], other)
    flat_models = [tree.flatten(m) for m in models]
    flat_fishers = [tree.flatten(f) for f in fishers]
    paths = list(flat_models[0])
    merged_paths = (tree.resolve_rules(rules, paths, default=False, what="Fisher merge rule")
                    if rules is not None else dict.fromkeys(paths, True))
    merged = {}
    for path, first in flat_models[0].items():
        if not merged_paths[path]:
            merged[path] = first
            continue
        numerator = denominator = 0.0
        for index, (w, flat_model, flat_fisher) in enumerate(zip(weights, flat_models,
                                                                flat_fishers)):
            if path not in flat_fisher:
                raise ValueError(f"fishers[{index}] has no {path!r}; closest: "
                                 f"{', '.join(tree.closest_paths(path, flat_fisher))}")
            fisher = jnp.asarray(flat_fisher[path], jnp.float32)
            if fisher.shape != jnp.shape(first):
                raise ValueError(f"fishers[{index}] at {path} has shape {fisher.shape}; the "
                                 f"parameter has {jnp.shape(first)}")
            precision = w * jnp.maximum(fisher, epsilon)
            numerator = numerator + precision * jnp.asarray(flat_model[path], jnp.float32)
            denominator = denominator + precision
        merged[path] = (numerator / denominator).astype(jnp.asarray(first).dtype)
    return tree.unflatten(merged)
