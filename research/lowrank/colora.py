"""CoLoRA (Park, Kim & Chun, 2024, "Contribution-based Low-Rank Adaptation with Pre-training
Model for Real Image Restoration"): give each layer LoRA capacity in proportion to its
contribution to the new task, under a total rank budget, instead of one rank everywhere.

Contribution. CoLoRA scores layers with FAIG (Xie et al., 2021): integrated gradients of the
loss along the straight path from the pre-trained weights to task-tuned ones, summed over the
layer, ``|Σ ∫ ∇L(γ(α)) · (θ_t - θ_b) dα|``. Before any LoRA training there is no tuned model, so
:func:`contribution` takes ``θ_t`` one gradient step ``η·ḡ`` away (``ḡ`` the loss gradient
averaged over a few batches) and the integral at its start (over one small step the gradient
hardly moves). FAIG is then ``η·‖ḡ_W‖²``: the first-order loss decrease that tuning kernel ``W``
alone would bring. ``η`` is common to all kernels and cancels in the allocation, so the score
is ``‖ḡ_W‖²``.

Allocation. :func:`allocate` shares an integer budget in proportion to the scores, within
per-kernel bounds (water-filling), rounding by largest remainder so the ranks sum to the budget
exactly. :func:`target_rules` turns the ranks into LoRA ``targets`` (exact-path regexes), so
LoRA consumes them unchanged; :func:`write` / :func:`read_targets` store them as JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from research import tree


def contribution(loss_fn: Callable, params: dict, batches: dict,
                 candidates) -> dict[str, jax.Array]:
    """``{path: ‖mean gradient‖²}`` for each candidate kernel. ``loss_fn(params, batch)`` is a
    scalar mean loss; ``batches`` holds the batches stacked on a leading axis. Only the
    candidates are differentiated, so other weights get no gradient. Pure (jit it)."""
    flat = tree.flatten(params)
    missing = [p for p in candidates if p not in flat]
    if missing:
        raise ValueError(f"CoLoRA candidate {missing[0]!r} is not a parameter; closest: "
                         f"{', '.join(tree.closest_paths(missing[0], flat))}")
    chosen = {p: flat[p] for p in candidates}
    rest = {p: v for p, v in flat.items() if p not in chosen}
    grad_fn = jax.grad(lambda w, batch: loss_fn(tree.unflatten({**rest, **w}), batch))

    def accumulate(total, batch):
        return jax.tree.map(jnp.add, total, grad_fn(chosen, batch)), None

    zeros = jax.tree.map(jnp.zeros_like, chosen)
    total, _ = jax.lax.scan(accumulate, zeros, batches)
    count = jax.tree.leaves(batches)[0].shape[0]
    return {p: jnp.sum(jnp.square(g / count)) for p, g in total.items()}


def _bounds(paths, bound, name: str) -> dict[str, int]:
    values = bound if isinstance(bound, Mapping) else dict.fromkeys(paths, bound)
    missing = [p for p in paths if p not in values]
    if missing:
        raise ValueError(f"CoLoRA {name} has no entry for {missing[0]!r}")
    return {p: int(values[p]) for p in paths}


def allocate(scores: Mapping[str, float], budget: int, *, min_rank: int | Mapping = 1,
             max_rank: int | Mapping) -> dict[str, int]:
    """``{path: rank}`` summing exactly to ``budget``: ``clip(λ·score, min, max)`` with ``λ``
    set so the sum is ``budget``, then floors plus one unit each for the largest remainders
    (ties to the higher score). ``min_rank`` / ``max_rank``: one int or ``{path: int}`` (a
    kernel's max is at most its smaller side). Monotone: a higher score never gets less."""
    paths = list(scores)
    if not paths:
        raise ValueError("CoLoRA allocate: no scores")
    lo, hi = _bounds(paths, min_rank, "min_rank"), _bounds(paths, max_rank, "max_rank")
    bad = [p for p in paths if not 0 <= lo[p] <= hi[p]]
    if bad:
        raise ValueError(f"CoLoRA rank bounds for {bad[0]!r}: need 0 <= min_rank "
                         f"({lo[bad[0]]}) <= max_rank ({hi[bad[0]]})")
    s = {p: float(scores[p]) for p in paths}
    if any(not v >= 0 or math.isinf(v) for v in s.values()):
        raise ValueError(f"CoLoRA scores must be finite and >= 0; got {s}")
    floor_total, ceiling_total = sum(lo.values()), sum(hi.values())
    if not isinstance(budget, int) or not floor_total <= budget <= ceiling_total:
        raise ValueError(f"CoLoRA budget {budget!r} is outside [{floor_total}, "
                         f"{ceiling_total}]: {len(paths)} kernels need at least their "
                         f"min_rank (sum {floor_total}) and take at most their max_rank "
                         f"(sum {ceiling_total})")

    def filled(scale):
        return {p: min(max(scale * s[p], lo[p]), hi[p]) for p in paths}

    # Bisection on λ: the filled total rises monotonically from Σmin towards Σmax.
    low, high = 0.0, max((hi[p] / s[p] for p in paths if s[p] > 0), default=0.0)
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(filled(middle).values()) <= budget else (low, middle)
    share = filled(low)
    ranks = {p: min(math.floor(share[p] + 1e-9), hi[p]) for p in paths}
    order = sorted(paths, key=lambda p: (-(share[p] - ranks[p]), -s[p]))
    while (left := budget - sum(ranks.values())) > 0:  # more than one round: zero scores only
        room = [p for p in order if ranks[p] < hi[p]]
        for p in room[:left]:
            ranks[p] += 1
    return ranks


def target_rules(ranks: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    """LoRA ``targets``: one exact-path rule per kernel (rank 0 leaves a kernel alone)."""
    return tuple((re.escape(path), int(rank)) for path, rank in ranks.items())


def write(path: str, ranks: Mapping[str, int], scores: Mapping[str, float], **about) -> None:
    """Store the rules (and the ranks, scores and ``about`` for the record) as JSON, atomically:
    a reader sees the old file or the new one, never half of one."""
    record = {"targets": [list(rule) for rule in target_rules(ranks)], "ranks": dict(ranks),
              "scores": {p: float(v) for p, v in scores.items()}, **about}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as handle:
        json.dump(record, handle, indent=1)
    os.replace(handle.name, path)


def read_targets(path: str) -> tuple[tuple[str, int], ...]:
    """The LoRA ``targets`` rules stored by :func:`write`."""
    with open(path) as handle:
        record = json.load(handle)
    if "targets" not in record:
        raise ValueError(f"{path}: no 'targets' key; not a CoLoRA allocation file")
    return tuple((str(pattern), int(rank)) for pattern, rank in record["targets"])
