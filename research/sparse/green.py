"""GreenTrainer (Huang et al., 2023, "Towards Green AI in Fine-tuning Large Language Models via
Adaptive Backpropagation"): train the tensors that buy the most loss decrease per FLOP, under a
budget on the training step's FLOPs given as a fraction of full fine-tuning's.

What a selection saves is backpropagation: a trainable tensor needs the activation gradients
from the loss down to it, plus its own weight gradient and optimizer update, and tensors above
it then share that activation-gradient path. So the cost of a set is not a sum of per-tensor
costs but a union, read from one trace of the step's ``value_and_grad`` graph: each operation
is charged to the outputs (the loss, or the gradients of particular tensors) that need it, and
a selection pays the forward pass plus every backward operation one of its tensors needs.
XLA's cost analysis of the real training step anchors the model: the step training only the
always-trained leaves (the head and ``also_train``) and the full step fix the baseline and the
optimizer's per-entry cost, and the chosen set is measured by XLA and tightened until it fits:
two lowerings of the step per profile and one (rarely more) per budget, none per tensor. XLA
here is the cost analysis of the lowered step; on MiniLM it is within 0.5% of the compiled
step's. As the paper's rho, the budget includes the forward pass, so one below its share
(about 1/3) is an error.

Importance is the paper's first-order loss change of one optimizer step, ``-g . dw``, with
``dw`` Adam's first step (``-lr * g / |g|``) from the mean gradient of a few batches: per
tensor ``lr * |g|_1``; ``lr`` is common to all and dropped. The paper solves a dynamic program
over the chain of layers; with set costs this module picks greedily by importance per marginal
FLOP instead.

Selection needs the pretrained weights and data before the run: :meth:`GreenTrainer.prepare`
runs :func:`select` on the run's initial params and first batches (about a minute for MiniLM
on CPU), unless ``config.method.selected`` already names the tensors (a selection made once and
reused).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from research import methods, tree
from research.methods import Method, register
from research.sparse.selection import as_rules, head_rules
from research.train import loop, tasks


@register("green")
@dataclasses.dataclass(frozen=True)
class GreenTrainer(Method):
    """``config.method = dict(name='green', flops_budget=0.5, importance_batches=4,
    also_train=(regex, ...), selected=select(config).trainable)``.

    flops_budget: the step's FLOPs as a fraction of full fine-tuning's, in (0, 1].
    importance_batches: training batches whose mean gradient ranks the tensors.
    selected: regexes of the chosen tensors (exact paths); empty: :meth:`prepare` selects.
    The task head and ``also_train`` always train.
    """
    flops_budget: float = 0.5
    importance_batches: int = 4
    also_train: tuple[str, ...] = ()
    selected: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.flops_budget, (int, float)) or not 0 < self.flops_budget <= 1:
            raise ValueError(f"config.method.flops_budget={self.flops_budget!r} must be in (0, 1]")
        if not isinstance(self.importance_batches, int) or self.importance_batches < 1:
            raise ValueError(f"config.method.importance_batches={self.importance_batches!r} "
                             "must be a positive integer")
        object.__setattr__(self, "also_train", as_rules("green", self.also_train))
        object.__setattr__(self, "selected", as_rules("green", self.selected))

    def prepare(self, context: methods.Context) -> GreenTrainer:
        """The budget's selection on the run's initial params and first batches."""
        if self.selected:
            return self
        batches = context.batches()
        plan = select(context.config, context.params(),
                      [next(batches) for _ in range(self.importance_batches)])
        return dataclasses.replace(self, selected=plan.trainable)

    def trainable_for(self, shapes: dict) -> tuple[str, ...]:
        if not self.selected:
            raise ValueError("config.method.selected is empty: green chooses its tensors in "
                             "prepare (loop.make_setup runs it) or from "
                             "research.sparse.green.select(config).trainable")
        paths = list(tree.flatten(shapes))
        rules = self.selected + self.also_train
        tree.resolve_rules([(r, True) for r in rules], paths, what="green rule")
        return rules + head_rules(paths)


class Plan(NamedTuple):
    trainable: tuple[str, ...]  # escaped paths of the chosen tensors (head, also_train excluded)
    flops: float                # XLA FLOPs of the step that trains them
    full_flops: float           # XLA FLOPs of full fine-tuning's step


@dataclasses.dataclass(frozen=True)
class Profile:
    """Everything about a run that does not depend on the budget."""
    paths: list[str]
    sizes: np.ndarray         # entries per tensor
    importance: np.ndarray    # per tensor
    forced: np.ndarray        # bool: trains whatever the budget (head, also_train)
    op_flops: np.ndarray      # per group of operations with the same needs
    op_needs: np.ndarray      # bool [groups, tensors]: the gradient of which tensors needs it
    op_always: np.ndarray     # bool [groups]: needed by the loss itself (the forward pass)
    forced_flops: float       # XLA: the step training only the forced tensors
    full_flops: float         # XLA: full fine-tuning's step
    per_entry: float          # optimizer FLOPs per trained entry, from the two above
    measure: Callable[[tuple[str, ...]], float]  # XLA FLOPs of the step training these rules


def _loss(model, params, batch, rng, training: bool):
    """The task's mean loss, as the training loop computes it."""
    inputs, targets = tasks.model_inputs(model, batch, rng, training=training)
    logits = model.module.apply({"params": params}, **inputs, deterministic=not training,
                                rngs={"dropout": rng})
    sums = tasks.loss_sums(model, logits, targets)
    return sums["loss"] / jnp.maximum(sums["count"], 1.0)


def importance(model, params: dict, batches: list[dict]) -> dict[str, float]:
    """``|mean gradient|_1`` per tensor: the loss decrease of Adam's first step, over ``lr``."""
    grad = jax.jit(jax.grad(functools.partial(_loss, model, training=False)))
    total = None
    for batch in batches:
        g = grad(params, batch, jax.random.key(0))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return {path: float(jnp.abs(g).sum()) / len(batches) for path, g in tree.flatten(total).items()}


# Operations that move data: XLA's cost analysis counts no FLOPs for them.
_MOVES = frozenset({
    "broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims", "slice", "pad", "rev",
    "concatenate", "gather", "dynamic_slice", "dynamic_update_slice", "copy", "copy_p", "iota",
    "convert_element_type", "bitcast_convert_type", "stop_gradient", "select_n"})


def _size(aval) -> int:
    return math.prod(getattr(aval, "shape", ()))


def _flops(eqn) -> float:
    """FLOPs of one operation as XLA counts them: 2 per multiply-add in contractions, one per
    element elsewhere."""
    inner = list(core.jaxprs_in_params(eqn.params))
    if inner:
        return eqn.params.get("length", 1) * sum(_flops(e) for j in inner for e in j.eqns)
    name, out = eqn.primitive.name, eqn.outvars[0].aval
    if name == "dot_general":
        (contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * _size(out) * math.prod(lhs[i] for i in contracting)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval  # each output sums over the kernel's entries per output feature
        features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * _size(out) * _size(rhs) / features
    if name in _MOVES:
        return 0.0
    return float(max(_size(v.aval) for v in (*eqn.invars, *eqn.outvars) if hasattr(v, "aval")))


def operation_needs(model, shapes: dict, batch: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(paths, flops [groups], needs [groups, 1 + tensors])`` of the training loss's
    ``value_and_grad``: column 0 is the loss, column 1 + i the gradient of ``paths[i]``."""
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    loss = functools.partial(_loss, model, training=True)
    with jax.disable_jit():  # inline every jitted helper, so each operation is seen alone
        closed = jax.make_jaxpr(jax.value_and_grad(loss))(shapes, batch, jax.random.key(0))
    paths = ["/".join(str(k.key) for k in key) for key, _ in
             jax.tree_util.tree_flatten_with_path(shapes)[0]]
    needs: dict = {}
    for index, var in enumerate(closed.jaxpr.outvars):
        if isinstance(var, core.Var):
            needs[var] = needs.get(var, 0) | (1 << index)
    groups: dict[int, float] = {}
    for eqn in reversed(closed.jaxpr.eqns):
        mask = 0
        for var in eqn.outvars:
            mask |= needs.get(var, 0)
        if mask:
            groups[mask] = groups.get(mask, 0.0) + _flops(eqn)
            for var in eqn.invars:
                if isinstance(var, core.Var):
                    needs[var] = needs.get(var, 0) | mask
    masks = list(groups)
    bits = np.array([[(m >> i) & 1 for i in range(len(paths) + 1)] for m in masks], bool)
    return paths, np.array([groups[m] for m in masks]), bits


def step_flops(config, model, trainable, batch: dict) -> float:
    """XLA's FLOPs for the run's training step with ``trainable`` (regexes; None: all)."""
    variant = copy.deepcopy(config)
    with variant.unlocked():
        variant.method = dict(name="full")
        variant.optim.trainable = trainable
    setup = loop.make_setup(variant, model, int(config.train.steps))
    step = loop.make_train_step(setup, int(config.train.get("grad_accum", 1)),
                                config.train.get("rng_impl", "unsafe_rbg"))
    lowered = step.lower(setup.abstract_state, loop.global_batch(setup, batch))
    return float(lowered.cost_analysis()["flops"])


def _inputs(config, model, method: GreenTrainer):
    """The run's starting params and its first ``importance_batches`` training batches."""
    batches = loop.method_context(config, model).batches()
    return (loop.model_params(config, model),
            [next(batches) for _ in range(method.importance_batches)])


def profile(config, params: dict | None = None, batches: list[dict] | None = None) -> Profile:
    """Importance and costs for ``config`` (its ``method`` a green one), from ``params`` and
    ``batches`` (default: the run's starting params and first training batches)."""
    method = methods.build(config.method)
    if not isinstance(method, GreenTrainer):
        raise ValueError(f"config.method.name={config.method.name!r}: green.profile needs 'green'")
    model = loop.build_model(config)
    if params is None or batches is None:
        params, batches = _inputs(config, model, method)
    paths, op_flops, needs = operation_needs(model, model.param_shapes(), batches[0])
    scores = importance(model, params, batches)
    shapes = tree.flatten(model.param_shapes())
    forced_rules = head_rules(paths) + method.also_train
    forced = tree.resolve_rules([(r, True) for r in forced_rules], paths, default=False,
                                what="green also_train rule")
    forced = np.array([forced[p] for p in paths])
    sizes = np.array([shapes[p].size for p in paths], float)
    measure = functools.partial(step_flops, config, model, batch=batches[0])
    forced_flops, full_flops = measure(forced_rules), measure(None)
    op_always, op_needs = needs[:, 0], needs[:, 1:]
    paid_forced = op_always | op_needs[:, forced].any(1)
    backward = op_flops[~paid_forced & op_needs.any(1)].sum()
    per_entry = max(0.0, (full_flops - forced_flops - backward) / max(sizes[~forced].sum(), 1))
    return Profile(paths, sizes, np.array([scores[p] for p in paths]), forced, op_flops,
                   op_needs, op_always, forced_flops, full_flops, per_entry, measure)


def _greedy(prof: Profile, target: float) -> np.ndarray:
    """Tensors by importance per marginal FLOP while the modelled step stays within ``target``."""
    chosen = prof.forced.copy()
    paid = prof.op_always | prof.op_needs[:, chosen].any(1)
    cost = prof.forced_flops
    needs = prof.op_needs.astype(float)
    while True:
        marginal = (prof.op_flops * ~paid) @ needs + prof.per_entry * prof.sizes
        fits = ~chosen & (prof.importance > 0) & (cost + marginal <= target)
        if not fits.any():
            return chosen
        ratio = np.where(fits, prof.importance / np.maximum(marginal, 1e-9), -np.inf)
        best = int(np.argmax(ratio))
        chosen[best], cost = True, cost + marginal[best]
        paid |= prof.op_needs[:, best]


def choose(prof: Profile, flops_budget: float) -> Plan:
    """The tensors to train under ``flops_budget`` x full fine-tuning's step FLOPs, as measured
    by XLA."""
    if not isinstance(flops_budget, (int, float)) or not 0 < flops_budget <= 1:
        raise ValueError(f"config.method.flops_budget={flops_budget!r} must be in (0, 1]")
    limit = flops_budget * prof.full_flops
    if prof.forced_flops > limit:
        raise ValueError(f"config.method.flops_budget={flops_budget} is below the step that "
                         "trains only the head and also_train (forward pass included): "
                         f"{prof.forced_flops / prof.full_flops:.3f} of full fine-tuning")
    forced_rules = tuple(re.escape(p) for p, f in zip(prof.paths, prof.forced) if f)
    target = limit
    for _ in range(4):  # the model is close to XLA; each miss lowers the target by the excess
        chosen = _greedy(prof, target) & ~prof.forced
        rules = tuple(re.escape(p) for p, c in zip(prof.paths, chosen) if c)
        flops = prof.measure(forced_rules + rules) if rules else prof.forced_flops
        if flops <= limit:
            return Plan(rules, flops, prof.full_flops)
        target -= flops - limit
    return Plan((), prof.forced_flops, prof.full_flops)


def select(config, params: dict | None = None, batches: list[dict] | None = None) -> Plan:
    """:func:`choose` for ``config.method.flops_budget`` on :func:`profile` of ``config``."""
    return choose(profile(config, params, batches), float(config.method.flops_budget))
