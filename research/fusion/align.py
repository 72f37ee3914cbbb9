"""Align model B to model A along a :class:`~research.fusion.spec.Spec`, then fuse.

Transformer fusion with optimal transport (Imfeld et al., 2024): walk the spec's steps in flow
order; for each map build a ground cost between A's units and B's (from weights: the
producers' slices, with B's other axes already mapped into A's bases; from activations: the
units' outputs on the same inputs), solve it exactly (a permutation) or with Sinkhorn (a soft
map), and rewrite B with every map (:func:`apply_maps`). Averaging the aligned models is
:func:`fuse`. A map is ``[n_a, n_b]`` and row-stochastic: A's unit i receives the average of
the B units its row weighs, so B may be wider than A (heterogeneous fusion, also a way to
compress); a heads map is ``[kv_heads_a, head_dim_a, kv_heads_b, head_dim_b]``: the head plan
times each head pair's within-head map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research import tree
from research.fusion import solvers
from research.fusion.spec import Heads, Residual, Spec, Units

COSTS = ("weights", "activations")
SOLVERS = ("exact", "sinkhorn")
MARGINALS = ("uniform", "importance")
HEAD_MODES = ("across", "per_head")
POLICIES = ("average", "incoming", "sublayer")


@dataclasses.dataclass(frozen=True)
class Options:
    """How to align. ``residual``: rules ``(regex over "layer_{i}/attn|mlp", policy)``, first
    match wins; a policy is ``average`` (of the incoming map and the sublayer output's),
    ``incoming`` (the stream keeps one map: what permutation methods need), ``sublayer``, or a
    number in [0, 1], the incoming map's weight. ``epsilon`` is Sinkhorn's regulariser in units
    of the mean cost. ``heads``: ``across`` matches heads to heads (a head plan) before the
    dimensions within them; ``per_head`` keeps head i on head i."""
    cost: str = "weights"
    solver: str = "sinkhorn"
    epsilon: float = 0.05
    marginals: str = "uniform"
    heads: str = "across"
    residual: tuple = ((".*", "average"),)

    def __post_init__(self):
        for key, valid in (("cost", COSTS), ("solver", SOLVERS), ("marginals", MARGINALS),
                           ("heads", HEAD_MODES)):
            if getattr(self, key) not in valid:
                raise ValueError(f"fusion option {key}={getattr(self, key)!r} is not one of "
                                 f"{', '.join(valid)}")
        if not self.epsilon > 0:
            raise ValueError(f"fusion option epsilon={self.epsilon!r} must be > 0")
        if self.marginals == "importance" and self.solver == "exact":
            raise ValueError("fusion option marginals='importance' needs solver='sinkhorn' "
                             "(an exact assignment moves whole units)")
        object.__setattr__(self, "residual", tuple(tuple(rule) for rule in self.residual))
        for pattern, policy in self.residual:
            if not (policy in POLICIES or (isinstance(policy, (int, float))
                                           and not isinstance(policy, bool)
                                           and 0 <= policy <= 1)):
                raise ValueError(f"fusion option residual: policy {policy!r} for {pattern!r} "
                                 f"is not one of {', '.join(POLICIES)} or a weight in [0, 1]")


def _incoming_weight(policy) -> float:
    return {"average": 0.5, "incoming": 1.0, "sublayer": 0.0}.get(policy, policy)


# ---------------------------------------------------------------------------------------------
# Applying maps to leaves
# ---------------------------------------------------------------------------------------------


def _apply_units(x, axis: int, m):
    return jnp.moveaxis(jnp.tensordot(m, x, axes=(1, axis)), 0, axis)


def _apply_heads(x, axis: int, m):
    kv_a, dim_a, kv_b, dim_b = m.shape
    moved = jnp.moveaxis(x, (axis, axis + 1), (0, 1))
    heads, rest = moved.shape[0], moved.shape[2:]
    grouped = moved.reshape(kv_b, heads // kv_b, dim_b, *rest)
    mapped = jnp.einsum("iajb,jgb...->iga...", m, grouped)
    return jnp.moveaxis(mapped.reshape(kv_a * (heads // kv_b), dim_a, *rest), (0, 1),
                        (axis, axis + 1))


def transform_leaf(leaf, names: Sequence[str | None], maps: Mapping, skip: int | None = None):
    """``leaf`` with each axis's map applied (a heads map covers two axes). Maps not in
    ``maps`` yet, and the map at axis ``skip``, are left out: that axis stays in B's basis."""
    axis = 0
    while axis < len(names):
        name = names[axis]
        width = 2 if axis + 1 < len(names) and names[axis + 1] == name else 1
        if name is not None and axis != skip and name in maps:
            leaf = (_apply_units if width == 1 else _apply_heads)(leaf, axis, maps[name])
        axis += width
    return leaf


def apply_maps(spec: Spec, maps: Mapping, params_b: dict) -> dict:
    """B rewritten in A's bases: every leaf with every map of the spec applied."""
    return tree.map_with_path(lambda path, leaf: transform_leaf(leaf, spec.axes[path], maps),
                              params_b)


def random_permutation(spec: Spec, params: dict, key) -> dict:
    """Random permutation maps for ``params`` that keep its function: one permutation of the
    residual stream, of the heads (with their key/value groups) and of the dimensions within
    them (query/key dimensions stay put under rotary positions), and of each MLP's units."""
    flat = tree.flatten(params)
    keys = iter(jax.random.split(key, 4 * len(spec.steps)))

    def permutation(n):
        return jax.nn.one_hot(jax.random.permutation(next(keys), n), n)

    maps = {}
    for step in spec.steps:
        if isinstance(step, Residual):
            maps[step.out.name] = maps[step.name] = maps[step.incoming]
        elif isinstance(step, Heads):
            path, axis = step.vo_producers[0]
            kv_heads, dim = flat[path].shape[axis:axis + 2]
            heads = permutation(kv_heads)
            for name, moves in ((step.qk, step.within_qk), (step.vo, True)):
                within = jnp.stack([permutation(dim) if moves else jnp.eye(dim)
                                    for _ in range(kv_heads)])
                maps[name] = jnp.einsum("ij,iab->iajb", heads, within)
        else:
            path, axis = step.producers[0]
            maps[step.name] = permutation(flat[path].shape[axis])
    return maps


# ---------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------


def _sq_distances(a, b):
    """Squared distances between the rows of ``a`` [..., n_a, f] and ``b`` [..., n_b, f]."""
    return ((a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :]
            - 2 * jnp.einsum("...if,...jf->...ij", a, b))


def _units_rows(leaf, axis: int):
    return jnp.moveaxis(leaf, axis, 0).reshape(leaf.shape[axis], -1)


def _heads_rows(leaf, axis: int, kv_heads: int):
    """[kv_heads, head_dim, features]: a query head's rows join its key/value head's."""
    moved = jnp.moveaxis(leaf, (axis, axis + 1), (0, 1))
    heads, dim = moved.shape[:2]
    grouped = moved.reshape(kv_heads, heads // kv_heads, dim, -1)
    return jnp.swapaxes(grouped, 1, 2).reshape(kv_heads, dim, -1)


def _producers(flat: dict, producers):
    return [(path, axis) for path, axis in producers if path in flat]


def units_weight_cost(spec: Spec, producers, flat_a, flat_b, maps):
    """(cost [n_a, n_b], A's unit norms, B's unit norms) from the producers' weights."""
    rows_a, rows_b = [], []
    for path, axis in _producers(flat_a, producers):
        aligned = transform_leaf(flat_b[path], spec.axes[path], maps, skip=axis)
        rows_a.append(_units_rows(flat_a[path], axis))
        rows_b.append(_units_rows(aligned, axis))
    a, b = jnp.concatenate(rows_a, 1), jnp.concatenate(rows_b, 1)
    return _sq_distances(a, b), jnp.linalg.norm(a, axis=1), jnp.linalg.norm(b, axis=1)


def heads_weight_cost(spec: Spec, producers, flat_a, flat_b, maps, kv_a, kv_b):
    """Within-head costs of every head pair, [kv_a, kv_b, dim_a, dim_b]."""
    rows_a, rows_b = [], []
    for path, axis in _producers(flat_a, producers):
        aligned = transform_leaf(flat_b[path], spec.axes[path], maps, skip=axis)
        rows_a.append(_heads_rows(flat_a[path], axis, kv_a))
        rows_b.append(_heads_rows(aligned, axis, kv_b))
    a, b = jnp.concatenate(rows_a, -1), jnp.concatenate(rows_b, -1)
    return _sq_distances(a[:, None], b[None, :])


def _stats_cost(stats: dict):
    """Squared distances between units' activation vectors from their summed statistics."""
    sq_a, sq_b, cross = stats["sq_a"], stats["sq_b"], stats["cross"]
    if cross.ndim == 2:
        return jnp.maximum(sq_a[:, None] + sq_b[None, :] - 2 * cross, 0)
    return jnp.maximum(sq_a[:, None, :, None] + sq_b[None, :, None, :] - 2 * cross, 0)


# ---------------------------------------------------------------------------------------------
# Solving
# ---------------------------------------------------------------------------------------------


def _check_finite(name: str, cost) -> None:
    if not bool(jnp.all(jnp.isfinite(cost))):
        raise ValueError(f"map {name}: the {'x'.join(map(str, cost.shape))} cost has "
                         "non-finite entries (NaN or Inf in the weights or activations)")


def _plan(cost, options: Options, a=None, b=None):
    if options.solver == "exact":
        return solvers.assignment(cost)
    return solvers.sinkhorn(cost, options.epsilon, a, b)


def _marginal(norms, options: Options):
    if options.marginals == "uniform":
        return None
    return (norms + 1e-12) / jnp.sum(norms + 1e-12)


def _solve_units(name, cost, norms_a, norms_b, options):
    _check_finite(name, cost)
    n_a, n_b = cost.shape
    if options.solver == "exact" and n_a > n_b:
        raise ValueError(f"map {name}: A has {n_a} units and B {n_b}; an exact assignment "
                         "needs A no wider than B (fuse the wider model into the narrower)")
    plan = _plan(cost, options, _marginal(norms_a, options), _marginal(norms_b, options))
    return solvers.to_map(plan)


def solve_heads(step: Heads, cost_qk, cost_vo, options: Options):
    """The qk and vo heads maps from within-head costs [kv_a, kv_b, dim_a, dim_b]."""
    for name, cost in ((step.qk, cost_qk), (step.vo, cost_vo)):
        _check_finite(name, cost)
    kv_a, kv_b = cost_qk.shape[:2]
    if options.heads == "per_head" and kv_a != kv_b:
        raise ValueError(f"map {step.qk}: heads='per_head' needs equal head counts, got "
                         f"{kv_a} (A) and {kv_b} (B); use heads='across'")

    def within(name, cost, moves):
        dim_a, dim_b = cost.shape[2:]
        if not moves:
            if dim_a != dim_b:
                raise ValueError(f"map {name}: rotary heads keep their dimensions in place, "
                                 f"so head_dim must match, got {dim_a} (A) and {dim_b} (B)")
            return jnp.broadcast_to(jnp.eye(dim_a) / dim_a, cost.shape)
        if options.solver == "exact" and dim_a > dim_b:
            raise ValueError(f"map {name}: head_dim {dim_a} (A) > {dim_b} (B); an exact "
                             "assignment needs A no wider than B")
        return _plan(cost, options)  # one batched solve for all head pairs

    plan_qk = within(step.qk, cost_qk, step.within_qk)
    plan_vo = within(step.vo, cost_vo, True)
    if options.heads == "per_head":
        head_map = jnp.eye(kv_a)
    else:
        pair_cost = sum(c / jnp.maximum(c.mean(), 1e-30)
                        for c in ((plan_qk * cost_qk).sum((2, 3)), (plan_vo * cost_vo).sum((2, 3))))
        if options.solver == "exact" and kv_a > kv_b:
            raise ValueError(f"map {step.qk}: A has {kv_a} key/value heads and B {kv_b}; an "
                             "exact assignment needs A no wider than B")
        head_map = solvers.to_map(_plan(pair_cost, options))
    return {name: jnp.einsum("ij,ijab->iajb", head_map, solvers.to_map(plan))
            for name, plan in ((step.qk, plan_qk), (step.vo, plan_vo))}


def kv_heads(flat: dict, producers) -> int:
    """Key/value heads: the heads axis of the value projection (the vo producer)."""
    path, axis = producers[0]
    return flat[path].shape[axis]


def _check_groups(step: Heads, flat_a: dict, flat_b: dict) -> None:
    path, axis = step.qk_producers[0]  # the query projection
    groups = [flat[path].shape[axis] // kv_heads(flat, step.vo_producers)
              for flat in (flat_a, flat_b)]
    if groups[0] != groups[1]:
        raise ValueError(f"{step.qk.rpartition('/')[0]}: A has {groups[0]} query heads per "
                         f"key/value head and B {groups[1]}; fusion keeps the grouping")


def check_compatible(spec: Spec, params_a: dict, params_b: dict) -> None:
    """One-line errors for models the spec cannot align: a leaf one model lacks, a leaf the
    spec does not describe, or axes without a map whose sizes differ."""
    flat_a, flat_b = tree.flatten(params_a), tree.flatten(params_b)
    for path in flat_a.keys() ^ flat_b.keys():
        owner = "A" if path in flat_a else "B"
        raise ValueError(f"the models' trees differ: {path!r} is only in {owner} "
                         "(fusion needs the same architecture, up to widths)")
    for path, leaf_a in flat_a.items():
        if path not in spec.axes:
            raise ValueError(f"leaf {path!r} is not in the {spec.family} transport-map spec")
        shape_a, shape_b = np.shape(leaf_a), np.shape(flat_b[path])
        names = spec.axes[path]
        if len(shape_a) != len(names) or len(shape_b) != len(names):
            raise ValueError(f"leaf {path!r}: shapes {shape_a} (A) and {shape_b} (B) do not "
                             f"have the spec's {len(names)} axes")
        for axis, name in enumerate(names):
            if name is None and shape_a[axis] != shape_b[axis]:
                raise ValueError(f"leaf {path!r}: axis {axis} has no transport map, so its "
                                 f"size must match, got {shape_a} (A) and {shape_b} (B)")


def align(spec: Spec, params_a: dict, params_b: dict, options: Options = Options(),
          stats: Mapping | None = None) -> dict:
    """Transport maps (name -> map) that carry B into A's bases. ``stats`` (from
    :func:`research.fusion.activations.collect`) is required when ``options.cost`` is
    ``activations``."""
    check_compatible(spec, params_a, params_b)
    if options.cost == "activations" and not stats:
        raise ValueError("fusion option cost='activations' needs activation statistics "
                         "(research.fusion.activations.collect on at least one batch)")
    flat_a, flat_b = tree.flatten(params_a), tree.flatten(params_b)
    policies = tree.resolve_rules(
        options.residual, [s.block for s in spec.steps if isinstance(s, Residual)],
        default="average", what="residual policy rule")
    maps: dict = {}

    def units_map(step: Units):
        if options.cost == "activations":
            s = stats[step.name]
            return _solve_units(step.name, _stats_cost(s), jnp.sqrt(s["sq_a"]),
                                jnp.sqrt(s["sq_b"]), options)
        return _solve_units(step.name, *units_weight_cost(
            spec, step.producers, flat_a, flat_b, maps), options)

    for step in spec.steps:
        if isinstance(step, Units):
            maps[step.name] = units_map(step)
        elif isinstance(step, Heads):
            _check_groups(step, flat_a, flat_b)
            if options.cost == "activations":
                costs = [_stats_cost(stats[step.qk]), _stats_cost(stats[step.vo])]
            else:
                kv_a, kv_b = (kv_heads(flat, step.vo_producers) for flat in (flat_a, flat_b))
                costs = [heads_weight_cost(spec, producers, flat_a, flat_b, maps, kv_a, kv_b)
                         for producers in (step.qk_producers, step.vo_producers)]
            maps.update(solve_heads(step, *costs, options))
        else:
            weight = _incoming_weight(policies[step.block])
            incoming = maps[step.incoming]
            maps[step.out.name] = incoming if weight == 1 else units_map(step.out)
            maps[step.name] = weight * incoming + (1 - weight) * maps[step.out.name]
    return maps


def fuse(spec: Spec, anchor: dict, others: Sequence[dict], weights: Sequence[float] | None = None,
         options: Options = Options(), stats: Sequence[Mapping] | None = None) -> dict:
    """Align each of ``others`` to ``anchor`` and average all of them with ``weights`` (one per
    model, anchor first; uniform by default). The result has the anchor's shapes."""
    count = len(others) + 1
    weights = [1.0 / count] * count if weights is None else list(weights)
    if len(weights) != count or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"fusion weights {weights} must be {count} numbers (anchor first) "
                         "summing to 1")
    stats = [None] * len(others) if stats is None else list(stats)
    if len(stats) != len(others):
        raise ValueError(f"fusion got {len(stats)} activation statistics for {len(others)} "
                         "models to align")
    fused = tree.scale(anchor, weights[0])
    for other, weight, other_stats in zip(others, weights[1:], stats):
        aligned = apply_maps(spec, align(spec, anchor, other, options, other_stats), other)
        fused = tree.add(fused, tree.scale(aligned, weight))
    return fused
