"""Permutation baselines for fusion: weight matching and activation matching.

Weight matching is git-re-basin's (Ainsworth et al., 2023, "Git Re-Basin: Merging Models
modulo Permutation Symmetries") coordinate descent, here over a transformer's spec: every map
is a permutation, the residual stream has one for the whole depth (a residual connection adds
two streams, so both must move alike), and each round re-solves one map at a time, in random
order, against every leaf it touches (not only its producers) with all other maps at their
current values, until a round changes nothing. Maximising ``<W_A, P W_B>`` over a permutation
is minimising the squared distance, so the costs are the alignment module's.

Activation matching (their second method) is one pass of exact assignments on activation
costs with the same single residual map: :data:`ACTIVATION_MATCHING` options for
:func:`research.fusion.align.align`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from research import tree
from research.fusion import solvers
from research.fusion.align import (Options, heads_weight_cost, kv_heads, solve_heads,
                                   units_weight_cost)
from research.fusion.spec import Heads, Residual, Spec

ACTIVATION_MATCHING = Options(cost="activations", solver="exact", residual=((".*", "incoming"),))
_EXACT = Options(solver="exact")


def _roots(spec: Spec) -> dict[str, str]:
    """Map name -> the map it is in weight matching: residual maps are their stream's first."""
    roots = {}
    for step in spec.steps:
        if isinstance(step, Residual):
            roots[step.name] = roots[step.out.name] = roots[step.incoming]
        elif isinstance(step, Heads):
            roots[step.qk], roots[step.vo] = step.qk, step.vo
        else:
            roots[step.name] = step.name
    return roots


def _touching(spec: Spec, flat: dict, roots: dict, name: str) -> tuple[tuple[str, int], ...]:
    """Every (leaf, axis) whose map is ``name`` (a heads map: its heads axis)."""
    found = []
    for path, names in spec.axes.items():
        if path not in flat:
            continue
        for axis, axis_name in enumerate(names):
            starts = axis == 0 or names[axis - 1] != axis_name
            if axis_name is not None and roots[axis_name] == name and starts:
                found.append((path, axis))
    return tuple(found)


def weight_matching(spec: Spec, params_a: dict, params_b: dict, *, seed: int = 0,
                    max_rounds: int = 30) -> dict:
    """Permutation maps (every map name of ``spec``) aligning B to A by coordinate descent."""
    flat_a, flat_b = tree.flatten(params_a), tree.flatten(params_b)
    roots = _roots(spec)
    units = [s.name for s in spec.steps if not isinstance(s, (Heads, Residual))]
    heads = [s for s in spec.steps if isinstance(s, Heads)]
    touching = {name: _touching(spec, flat_a, roots, name)
                for name in units + [n for s in heads for n in (s.qk, s.vo)]}
    current = {}
    for name in units:
        path, axis = touching[name][0]
        current[name] = jnp.eye(flat_a[path].shape[axis])
    for step in heads:
        path, axis = step.vo_producers[0]
        kv, dim = flat_a[path].shape[axis:axis + 2]
        for name in (step.qk, step.vo):
            current[name] = jnp.einsum("ij,ab->iajb", jnp.eye(kv), jnp.eye(dim))

    def expanded():
        return {name: current[root] for name, root in roots.items()}

    order = np.random.default_rng(seed)
    targets = units + heads
    for _ in range(max_rounds):
        changed = False
        for index in order.permutation(len(targets)):
            target = targets[index]
            maps = expanded()
            if isinstance(target, Heads):
                kv_a, kv_b = (kv_heads(f, target.vo_producers) for f in (flat_a, flat_b))
                costs = [heads_weight_cost(spec, touching[name], flat_a, flat_b, maps, kv_a, kv_b)
                         for name in (target.qk, target.vo)]
                new = solve_heads(target, *costs, _EXACT)
            else:
                cost, _, _ = units_weight_cost(spec, touching[target], flat_a, flat_b, maps)
                new = {target: solvers.to_map(solvers.assignment(cost))}
            for name, value in new.items():
                changed |= not bool(jnp.array_equal(value, current[name]))
                current[name] = value
        if not changed:
            break
    return expanded()
