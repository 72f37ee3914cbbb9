"""Activation statistics for activation-based transport costs.

The activation cost between A's unit i and B's unit j is the squared distance of their outputs
over the same inputs (every token of every example): ``|a_i|^2 + |b_j|^2 - 2 a_i.b_j``. Those
three sums are all the solver needs, so :func:`collect` accumulates them batch by batch with
one jitted step and never holds a layer's activations for the whole set (for ViT-B/16 on 256
images they would be about 16 GB). Heads sites give within-head statistics for every head
pair, ``cross [kv_a, kv_b, dim_a, dim_b]``; query heads count as extra samples of their
key/value head, and queries and keys as samples of one query/key basis.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp

from research.fusion.spec import Heads, Residual, Spec


def _units_stats(acts_a, acts_b) -> dict:
    a = acts_a.reshape(-1, acts_a.shape[-1]).astype(jnp.float32)
    b = acts_b.reshape(-1, acts_b.shape[-1]).astype(jnp.float32)
    return {"sq_a": (a * a).sum(0), "sq_b": (b * b).sum(0), "cross": a.T @ b}


def _head_samples(arrays) -> jax.Array:
    """[samples, kv_heads, head_dim] from ``[..., heads, head_dim]`` arrays; the key/value
    projection has the fewest heads, and each query head joins its group's."""
    kv_heads = min(x.shape[-2] for x in arrays)
    samples = []
    for x in arrays:
        heads, dim = x.shape[-2:]
        grouped = x.reshape(-1, kv_heads, heads // kv_heads, dim)
        samples.append(jnp.swapaxes(grouped, 1, 2).reshape(-1, kv_heads, dim))
    return jnp.concatenate(samples).astype(jnp.float32)


def _heads_stats(arrays_a, arrays_b) -> dict:
    a, b = _head_samples(arrays_a), _head_samples(arrays_b)
    return {"sq_a": (a * a).sum(0), "sq_b": (b * b).sum(0),
            "cross": jnp.einsum("sia,sjb->ijab", a, b)}


def site_stats(spec: Spec, captured_a: dict, captured_b: dict) -> dict:
    """Statistics of every solved map of ``spec`` from two captures of the same inputs."""
    stats = {}
    for step in spec.steps:
        if isinstance(step, Heads):
            stats[step.qk] = _heads_stats(step.qk_site(captured_a), step.qk_site(captured_b))
            stats[step.vo] = _heads_stats(step.vo_site(captured_a), step.vo_site(captured_b))
        else:
            units = step.out if isinstance(step, Residual) else step
            stats[units.name] = _units_stats(units.site(captured_a), units.site(captured_b))
    return stats


def capture(model, params: dict, inputs: Mapping) -> dict:
    """Every module's output on ``inputs`` (deterministic: no dropout)."""
    _, state = model.module.apply({"params": params}, **inputs, deterministic=True,
                                  capture_intermediates=True, mutable=["intermediates"])
    return state["intermediates"]


def collect(spec: Spec, model_a, params_a: dict, model_b, params_b: dict,
            batches: Iterable[Mapping]) -> dict:
    """Summed statistics over ``batches`` (dicts holding the models' inputs, e.g. loader
    batches). Models may differ in widths (heterogeneous fusion)."""
    @jax.jit
    def batch_stats(params_a, params_b, inputs):
        return site_stats(spec, capture(model_a, params_a, inputs),
                          capture(model_b, params_b, inputs))

    total = None
    for index, batch in enumerate(batches):
        required = model_a.module.input_names[0]
        if required not in batch:
            raise ValueError(f"activation batch {index} lacks {required!r}, which the "
                             f"{model_a.family} {model_a.head} model reads")
        inputs = {n: batch[n] for n in model_a.module.input_names if n in batch}
        stats = batch_stats(params_a, params_b, inputs)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    if total is None:
        raise ValueError("activation statistics need at least one batch of inputs; got none")
    return total
