"""AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning"): LoRA's update in the form of a singular value decomposition, ``ΔW = P·Λ·Q``,
whose rank budget moves during training to the matrices that need it: the singular values of
least importance are masked to zero, on a schedule that shrinks the total rank.

As PEFT 0.21 does it (``peft/tuners/adalora``):

- :meth:`AdaLoRA.init` puts three leaves beside each chosen kernel: ``adalora_a`` (Q: the
  kernel's input axes plus the rank; PEFT's ``lora_A [r, in]``), ``adalora_e`` (Λ, ``[r]``;
  ``lora_E [r, 1]``) and ``adalora_b`` (P: the rank plus the output axes; ``lora_B [out, r]``).
  A and B ~ N(0, 0.02²), E = 0, so the model is unchanged at step 0. The layer computes
  ``x·W + s·((x·A)·diag(E))·B`` with ``s = alpha / (init_r + 1e-5)`` for good (PEFT's
  ``ranknum`` is never updated: masking does not rescale).
- :meth:`AdaLoRA.apply` adds, in training, the orthogonality regulariser as a loss term:
  ``orth_reg_weight`` times the mean over every A and B of ``‖AAᵀ − I‖`` and ``‖BᵀB − I‖``
  (the Frobenius norm itself, not its square).
- :meth:`AdaLoRA.after_update` is PEFT's ``update_and_allocate``, run in the jitted step after
  the optimizer's update with that step's gradients. Each entry's importance is the EMA
  (``beta1``) of its sensitivity ``I = |w·∇w|`` times the EMA (``beta2``) of its uncertainty
  ``|I − Ī|``; a triplet's (one singular value) is its E entry's plus the means over its row of
  A and its column of B. With ``s`` the step (0 = the first update) and ``T = total_step −
  tfinal``: while ``s ≤ tinit`` the averages only learn; for ``tinit < s < T`` the budget
  falls cubically from ``n·init_r`` to ``n·target_r`` (n targets) and every ``delta_t``-th step
  the triplets scoring at most the ``(n·init_r − budget)``-th smallest score get E = 0; at
  ``s = T`` the averages stop and the triplets are masked to ``n·target_r``, the final
  ``rank_pattern``, which every later step applies again. Ties at the threshold are all masked,
  as in PEFT; where PEFT fails (the budget has not yet fallen by one: ``torch.kthvalue`` with
  k = 0) nothing is masked. The averages and the rank pattern are the method's train state
  (:meth:`AdaLoRA.init_state`), checkpointed with the run.

:meth:`AdaLoRA.export` folds ``s·A·diag(E)·B`` into each kernel. :func:`export_adalora_peft` and
:func:`import_adalora_peft` read and write PEFT's on-disk format (``adapter_config.json`` +
``adapter_model.safetensors``, tensors ``base_model.model.M.lora_A|lora_E|lora_B``, and a
``rank_pattern`` after training, by which PEFT stores only the kept triplets) through
:mod:`research.peft_format`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from research import peft_format, sites, tree
from research.lowrank.lora import DEFAULT_INPUT_AXES, low_rank
from research.methods import Applied, Method, register, training
from research.models import hf
from research.models.dropout import dropout
from research.peft_format import KEY_PREFIX

A, E, B = "adalora_a", "adalora_e", "adalora_b"
LEAF_PATTERN = r"(.*/)?adalora_(a|e|b)"
# PEFT's default for BERT-like models: queries and values.
DEFAULT_TARGETS = (r"(.*/)?attn/(query|value)/kernel",)
INIT_STD = 0.02  # PEFT's normal init of A and B
RANKNUM_EPS = 1e-5  # PEFT scales by alpha / (ranknum + 1e-5)

PEFT_TYPE = "ADALORA"
# PEFT 0.21 saves no ranknum (always init_r); a file holding one is read and checked.
PEFT_PARTS = ("lora_A", "lora_E", "lora_B", "ranknum")


@dataclasses.dataclass(frozen=True)
class Target:
    """What :meth:`AdaLoRA.plan` decided for one kernel."""
    path: str
    input_axes: int
    shape: tuple

    @property
    def module(self) -> str:
        return sites.parent(self.path)

    def leaf(self, name: str) -> str:
        return sites.join(self.module, name)

    def shapes(self, rank: int) -> dict[str, tuple]:
        n_in = self.input_axes
        return {A: (*self.shape[:n_in], rank), E: (rank,), B: (rank, *self.shape[n_in:])}



def strip_leaves(flat: dict) -> dict:
    return {p: v for p, v in flat.items() if sites.leaf(p) not in (A, E, B)}


def _is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@register("adalora")
@dataclasses.dataclass(frozen=True)
class AdaLoRA(Method):
    """AdaLoRA options (``config.method = dict(name='adalora', ...)``); PEFT's names and
    defaults, but ``alpha`` (``lora_alpha``), ``dropout`` (``lora_dropout``) and ``delta_t``
    (``deltaT``).

    targets: regexes, or ordered ``(regex, bool)`` rules (first match wins), over kernel paths;
        default queries and values.
    init_r, target_r: the rank of every target at the start, and the average rank the budget
        falls to.
    tinit, tfinal, delta_t, total_step: the budget schedule (see the module docstring);
        ``total_step`` defaults to the run's ``config.train.steps``.
    beta1, beta2: the EMA factors of the sensitivity and the uncertainty.
    orth_reg_weight: the weight of the orthogonality regulariser (0: none).
    alpha: the scale numerator (``s = alpha / (init_r + 1e-5)``; alpha <= 0 means init_r).
    dropout: dropout on the input of the low-rank path while training ('dropout' rng).
    also_train: extra path regexes that train (a classifier head); ``trainable``, when given,
        replaces the default (the three leaves plus ``also_train``).
    input_axes: ``(regex, n)`` rules saying how many leading kernel axes are inputs (default 1;
        the zoo's attention output has 2).
    """

    targets: tuple = DEFAULT_TARGETS
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    total_step: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    alpha: float = 8.0
    dropout: float = 0.0
    also_train: tuple = ()
    input_axes: tuple = DEFAULT_INPUT_AXES

    adapter_leaves: ClassVar[tuple] = (LEAF_PATTERN,)
    # The budget is shared across layers, which a scanned block (one for all) cannot hold.
    scannable: ClassVar[bool] = False

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "targets", tree.choice_rules(self.targets, "AdaLoRA target"))
        set_(self, "also_train", tuple(self.also_train or ()))
        set_(self, "input_axes", tuple(tuple(r) if isinstance(r, list) else r
                                       for r in self.input_axes or ()))
        if not self.targets:
            raise ValueError("AdaLoRA needs targets: regexes over kernel paths")
        if not _is_count(self.init_r, 1):
            raise ValueError(f"AdaLoRA init_r={self.init_r!r} is not a positive integer")
        if not _is_count(self.target_r, 0):
            raise ValueError(f"AdaLoRA target_r={self.target_r!r} is not a non-negative "
                             f"integer")
        if self.target_r > self.init_r:
            raise ValueError(f"AdaLoRA target_r={self.target_r} > init_r={self.init_r}: "
                             f"AdaLoRA with a target budget above the initial rank")
        for name, least in (("tinit", 0), ("tfinal", 0), ("delta_t", 1)):
            if not _is_count(getattr(self, name), least):
                raise ValueError(f"AdaLoRA {name}={getattr(self, name)!r} is not an integer "
                                 f">= {least}")
        if self.total_step is not None:
            if not _is_count(self.total_step, 1):
                raise ValueError(f"AdaLoRA total_step={self.total_step!r} is not a positive "
                                 f"integer")
            if self.tinit + self.tfinal >= self.total_step:
                raise ValueError(f"AdaLoRA tinit={self.tinit} + tfinal={self.tfinal} >= "
                                 f"total_step={self.total_step}: no step is left to allocate "
                                 f"ranks in")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"AdaLoRA {name}={getattr(self, name)!r} is not in (0, 1)")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoRA orth_reg_weight={self.orth_reg_weight!r} is negative")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoRA dropout={self.dropout!r} is not in [0, 1)")
        set_(self, "trainable", (*self.adapter_leaves, *self.also_train)
             if self.trainable is None else tuple(self.trainable))

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha > 0 else self.init_r) / (self.init_r + RANKNUM_EPS)

    def plan(self, params) -> dict[str, Target]:
        """``{kernel path: Target}`` for ``params`` (arrays or shapes); a target rule matching
        no kernel is a one-line error naming the closest."""
        flat = strip_leaves(tree.flatten(params))
        kernels = [p for p in flat if sites.leaf(p) == "kernel"]
        chosen = tree.resolve_rules(self.targets, kernels, default=False,
                                    what="AdaLoRA target rule")
        chosen = [p for p in kernels if chosen[p]]
        inputs = tree.resolve_rules(self.input_axes, chosen, default=1, require_match=False)
        plan = {}
        for path in chosen:
            shape, n_in = tuple(flat[path].shape), int(inputs[path])
            if not 0 < n_in < len(shape):
                raise ValueError(f"AdaLoRA target {path} {shape}: {n_in} input axes leave no "
                                 f"output axis")
            plan[path] = Target(path, n_in, shape)
        return plan

    # --- the budget schedule ---------------------------------------------------------------

    def _final_step(self) -> int:
        if self.total_step is None:
            raise ValueError("AdaLoRA total_step is unset: give it, or let prepare take the "
                             "run's config.train.steps")
        return self.total_step - self.tfinal

    def budget(self, step: int, targets: int) -> int:
        """The total rank allowed at ``step`` over ``targets`` matrices: PEFT's
        ``budget_schedule``, in Python floats as there."""
        start, final = targets * self.init_r, targets * self.target_r
        end = self._final_step()
        if step <= self.tinit:
            return start
        if step > end:
            return final
        remaining = 1 - (step - self.tinit) / (end - self.tinit)
        return int((start - final) * (remaining ** 3) + final)

    def budget_table(self, targets: int):
        """The budget of every step up to the final allocation, one table: Python's float64
        decides the floor where the cubic meets an integer exactly, as in PEFT; float32 in the
        step could round the other way."""
        return jnp.asarray([self.budget(s, targets) for s in range(self._final_step() + 1)],
                           jnp.int32)

    # --- the Method interface --------------------------------------------------------------

    def prepare(self, context) -> AdaLoRA:
        """``total_step`` from the run's ``config.train.steps`` when not given."""
        if self.total_step is not None:
            return self
        steps = context.config.train.get("steps") if context.config is not None else None
        if steps is None:
            raise ValueError("AdaLoRA needs total_step (config.method.total_step, or the run's "
                             "config.train.steps)")
        return dataclasses.replace(self, total_step=int(steps))

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with A, E, B beside every target (leaves already there are kept)."""
        del stats
        flat = dict(tree.flatten(params))
        for index, target in enumerate(self.plan(params).values()):
            shapes = target.shapes(self.init_r)
            present = {name: tuple(flat[target.leaf(name)].shape) for name in shapes
                       if target.leaf(name) in flat}
            if present:
                if present != shapes:
                    raise ValueError(f"AdaLoRA leaves at {target.module} have shapes {present}; "
                                     f"{target.path} {target.shape} at init_r={self.init_r} "
                                     f"needs {shapes}")
                continue
            dtype = flat[target.path].dtype
            key_a, key_b = jax.random.split(jax.random.fold_in(rng, index))
            flat[target.leaf(A)] = INIT_STD * jax.random.normal(key_a, shapes[A], dtype)
            flat[target.leaf(E)] = jnp.zeros(shapes[E], dtype)
            flat[target.leaf(B)] = INIT_STD * jax.random.normal(key_b, shapes[B], dtype)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """A takes the kernel's input axes, B its output axes; the rank axis has no name."""
        flat_logical, flat_shapes = dict(tree.flatten(logical)), tree.flatten(shapes)
        for path, target in self.plan(shapes).items():
            if target.leaf(E) not in flat_shapes:
                continue
            axes = tuple(flat_logical.get(path) or ())
            axes = axes + (None,) * (len(target.shape) - len(axes))
            n_in = target.input_axes
            flat_logical[target.leaf(A)] = (*axes[:n_in], None)
            flat_logical[target.leaf(E)] = (None,)
            flat_logical[target.leaf(B)] = (None, *axes[n_in:])
        return tree.unflatten(flat_logical)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """``module.apply`` with ``s·((x·A)·diag(E))·B`` added at every adapted layer; in
        training, the orthogonality regulariser as a loss term and the mean kept rank (nonzero
        singular values per target) as a metric."""
        rate = self.dropout if training(kwargs) else 0.0
        path = functools.partial(_svd_path, scale=self.scale, rate=rate)
        with sites.intercept(path, sites.holding(A, E, B)):
            outputs = module.apply(variables, *args, **kwargs)
        triplets = _triplets(tree.flatten(variables["params"]))
        if not training(kwargs) or not triplets:
            return Applied(outputs)
        losses = ({"adalora_orth": self.orth_reg_weight * orthogonality(triplets)}
                  if self.orth_reg_weight else {})
        rank = sum(jnp.count_nonzero(e) for _, e, _ in triplets.values()) / len(triplets)
        return Applied(outputs, losses, {"adalora_rank": rank})

    def init_state(self, trainable: dict) -> dict:
        """The allocator's state: the sensitivity and uncertainty averages of every A, E and B
        (zeros) and the rank pattern (a kept flag per singular value, all kept)."""
        flat = tree.flatten(trainable)
        triplets = _triplet_paths(flat)
        if not triplets:
            raise ValueError(f"AdaLoRA: no {E} among the {len(flat)} trainable leaves (check "
                             f"config.optim.trainable / frozen)")
        def zeros():
            return tree.unflatten({p: jnp.zeros(flat[p].shape, jnp.float32)
                                   for paths in triplets.values() for p in paths})
        return {"sensitivity": zeros(), "uncertainty": zeros(),
                "rank_pattern": tree.unflatten({e: jnp.ones(flat[e].shape, bool)
                                                for _, e, _ in triplets.values()})}

    def after_update(self, state: dict, trainable: dict, grads: dict,
                     step) -> tuple[dict, dict]:
        """PEFT's ``update_and_allocate(step)``: the importance averages learn from ``grads``
        (before the final allocation), then, on an allocation step, the least important
        singular values are masked to the budget (see the module docstring)."""
        flat, flat_grads = dict(tree.flatten(trainable)), tree.flatten(grads)
        sensitivity = dict(tree.flatten(state["sensitivity"]))
        uncertainty = dict(tree.flatten(state["uncertainty"]))
        keep = tree.flatten(state["rank_pattern"])
        end = self._final_step()
        learning = step < end
        for path in sensitivity:
            weight = flat[path].astype(jnp.float32)
            now = jnp.abs(weight * flat_grads[path].astype(jnp.float32))
            smooth = self.beta1 * sensitivity[path] + (1 - self.beta1) * now
            spread = self.beta2 * uncertainty[path] + (1 - self.beta2) * jnp.abs(now - smooth)
            sensitivity[path] = jnp.where(learning, smooth, sensitivity[path])
            uncertainty[path] = jnp.where(learning, spread, uncertainty[path])

        paths = _triplet_paths(flat)
        scores = {e: triplet_scores(*(sensitivity[p] * uncertainty[p] for p in (a, e, b)))
                  for a, e, b in paths.values()}
        budgets = self.budget_table(len(paths))
        masked = budgets[0] - budgets[jnp.clip(step, 0, end)]  # PEFT's k
        allocate = (((step > self.tinit) & (step < end) & (step % self.delta_t == 0))
                    | (step == end))
        threshold = jnp.sort(jnp.concatenate(list(scores.values())))[jnp.maximum(masked - 1, 0)]
        masking = allocate | (step > end)  # past the final allocation, its pattern again
        kept = {}
        for e, score in scores.items():
            kept[e] = jnp.where(allocate, (score > threshold) | (masked <= 0), keep[e])
            flat[e] = jnp.where(masking & ~kept[e], jnp.zeros((), flat[e].dtype), flat[e])

        # The final allocation spends the averages; PEFT empties them there.
        def spent(averages):
            return tree.unflatten({p: jnp.where(step == end, 0.0, v)
                                   for p, v in averages.items()})
        return tree.unflatten(flat), {"sensitivity": spent(sensitivity),
                                      "uncertainty": spent(uncertainty),
                                      "rank_pattern": tree.unflatten(kept)}

    def export(self, params: dict) -> dict:
        """The base with ``s·A·diag(E)·B`` folded into each kernel (:func:`fold`)."""
        return fold(params, self.scale)


def triplet_scores(a, e, b):
    """One matrix's triplet importances ``[r]`` from the per-entry scores of A ``[in..., r]``,
    E ``[r]`` and B ``[r, out...]``: E's plus A's mean over its inputs plus B's over its
    outputs."""
    return (e + jnp.mean(a, axis=tuple(range(a.ndim - 1)))
            + jnp.mean(b, axis=tuple(range(1, b.ndim))))


def _triplet_paths(flat) -> dict[str, tuple[str, str, str]]:
    """``{module: (A path, E path, B path)}`` for every E in a flat tree; an E whose A or B is
    missing (frozen away from the trainable tree, say) is an error."""
    triplets = {}
    for path in flat:
        if sites.leaf(path) != E:
            continue
        module = sites.parent(path)
        a, b = sites.join(module, A), sites.join(module, B)
        for partner in (a, b):
            if partner not in flat:
                raise ValueError(f"AdaLoRA leaf {path} has no {partner} beside it: A, E and B "
                                 f"go together (and train together: check "
                                 f"config.optim.trainable / frozen)")
        triplets[module] = (a, path, b)
    return triplets


def _triplets(flat) -> dict[str, tuple]:
    return {module: tuple(flat[p] for p in paths)
            for module, paths in _triplet_paths(flat).items()}


def orthogonality(triplets: dict[str, tuple]) -> jax.Array:
    """PEFT's regulariser before its weight: the mean over every A and B of the Frobenius norm
    of ``AAᵀ − I`` (``BᵀB − I``), with A and B in PEFT's ``[r, in]`` and ``[out, r]``."""
    norms = []
    for a, _, b in triplets.values():
        rank = a.shape[-1]
        for rows in (a.reshape(-1, rank).T, b.reshape(rank, -1)):
            rows = rows.astype(jnp.float32)
            gram = jnp.matmul(rows, rows.T, precision=jax.lax.Precision.HIGHEST)
            norms.append(jnp.sqrt(jnp.sum(jnp.square(gram - jnp.eye(rank)))))
    return sum(norms) / len(norms)


def _svd_path(call: sites.Call, scale: float, rate: float):
    a, e, b = call.param(A), call.param(E), call.param(B)
    y, n_in, dtype = call.output(), call.input_axes, call.dtype(a)
    if a.ndim - 1 != n_in:
        raise ValueError(f"AdaLoRA leaf {call.path}/{A} {a.shape} has {a.ndim - 1} input axes; "
                         f"the layer's kernel has {n_in} (set AdaLoRA input_axes)")
    x = call.inputs.astype(dtype)
    if rate:
        x = dropout(call.layer.make_rng("dropout"), rate, x)
    delta = low_rank(x, (a * e).astype(dtype), b.astype(dtype), n_in, scale)
    return y + delta.astype(y.dtype)


def fold(params, scale: float) -> dict:
    """Plain params: ``W + s·A·diag(E)·B`` in each adapted kernel, the three leaves dropped."""
    flat = dict(tree.flatten(params))
    for module, (a, e, b) in _triplet_paths(flat).items():
        kernel = sites.join(module, "kernel")
        update = jnp.tensordot(flat.pop(a) * flat.pop(e), flat.pop(b), 1,
                               precision=jax.lax.Precision.HIGHEST)
        flat[kernel] = (flat[kernel] + scale * update).astype(flat[kernel].dtype)
    return tree.unflatten(flat)


def rank_pattern(method_state: dict) -> dict[str, np.ndarray]:
    """``{E path: kept flags [r]}`` from a run's ``method_state`` (the train state's), for
    :func:`export_adalora_peft`."""
    return {p: np.asarray(v, bool)
            for p, v in tree.flatten(jax.device_get(method_state["rank_pattern"])).items()}


# ---------------------------------------------------------------------------------------------
# PEFT's on-disk format
# ---------------------------------------------------------------------------------------------


def export_adalora_peft(method: AdaLoRA, params, model, directory: str, *,
                        rank_pattern: dict | None = None,
                        base_model_name_or_path: str | None = None) -> dict:
    """Write ``params``' AdaLoRA leaves (and the ``also_train`` modules, as PEFT's
    ``modules_to_save``) as a PEFT adapter for ``model``'s ``transformers`` class, atomically.
    ``rank_pattern``: ``{E path: kept flags}`` after training (:func:`rank_pattern` of the
    run's ``method_state``); PEFT then stores the kept triplets only. Returns the config."""
    if method.total_step is None:
        raise ValueError("export_adalora_peft: AdaLoRA total_step is unset; PEFT's config "
                         "needs it")
    flat = tree.flatten(params)
    triplets = _triplet_paths(flat)
    if not triplets:
        raise ValueError("export_adalora_peft: params hold no AdaLoRA leaves")
    base = strip_leaves(flat)
    tree.check_same_structure(model.param_shapes(), tree.unflatten(base))
    names = peft_format.hf_names(model, base)
    pattern = dict(rank_pattern or {})
    unknown = sorted(set(pattern) - {e for _, e, _ in triplets.values()})
    if unknown:
        raise ValueError(f"export_adalora_peft: rank_pattern names {unknown[0]!r}, which is no "
                         f"{E} leaf of params")

    tensors, targets, peft_pattern = {}, set(), {}
    for module, (a_path, e_path, b_path) in triplets.items():
        kernel = sites.join(module, "kernel")
        name, layout = names[kernel]
        torch_module = peft_format.weight_module(name, kernel)
        peft_format.check_linear("export_adalora_peft", kernel, tuple(flat[kernel].shape),
                                 layout, flat[a_path].ndim - 1)
        a = layout.to_hf(np.asarray(flat[a_path], np.float32))
        b = hf.linear(1).to_hf(np.asarray(flat[b_path], np.float32))
        e = np.asarray(flat[e_path], np.float32).reshape(-1, 1)
        if e_path in pattern:
            kept = np.asarray(pattern[e_path], bool).reshape(-1)
            if kept.shape != (e.shape[0],):
                raise ValueError(f"export_adalora_peft: rank_pattern[{e_path!r}] has "
                                 f"{kept.size} flags; the rank is {e.shape[0]}")
            a, e, b = a[kept], e[kept], b[:, kept]
            peft_pattern[f"{torch_module}.lora_E"] = kept.tolist()
        for part, value in (("lora_A", a), ("lora_E", e), ("lora_B", b)):
            tensors[f"{KEY_PREFIX}{torch_module}.{part}"] = value
        targets.add(torch_module)

    saved, saved_tensors = peft_format.modules_to_save(
        method.also_train, base, names, targets, what="export_adalora_peft",
        carries="AdaLoRA leaves")
    tensors.update(saved_tensors)
    candidates = set(peft_format.adaptable_modules(names)) - set(saved)
    config = {
        "peft_type": PEFT_TYPE, "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "init_r": method.init_r, "target_r": method.target_r, "tinit": method.tinit,
        "tfinal": method.tfinal, "deltaT": method.delta_t, "total_step": method.total_step,
        "beta1": method.beta1, "beta2": method.beta2, "orth_reg_weight": method.orth_reg_weight,
        "rank_pattern": peft_pattern or None,
        "lora_alpha": method.alpha, "lora_dropout": method.dropout,
        "target_modules": peft_format.target_modules(targets, candidates),
        "modules_to_save": saved or None, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "revision": None,
    }
    peft_format.write_adapter(directory, config, tensors)
    return config


def _full_rank(parts: dict, kept, init_r: int, where: str) -> dict:
    """One module's ``lora_A [init_r, in]``, ``lora_E [init_r, 1]`` and ``lora_B [out,
    init_r]``: as stored, or, under a rank pattern, the kept triplets put back in their places
    and zeros in the dropped ones."""
    need = {"lora_A", "lora_E", "lora_B"}
    if not need <= set(parts):
        raise ValueError(f"{where} has {sorted(parts)}; AdaLoRA needs {sorted(need)}")
    if "ranknum" in parts and not np.allclose(parts["ranknum"], init_r):
        raise ValueError(f"{where}: ranknum {parts['ranknum'].reshape(-1).tolist()} is not "
                         f"init_r={init_r}; only PEFT's fixed ranknum is supported")
    a, e, b = parts["lora_A"], parts["lora_E"], parts["lora_B"]
    rank = e.shape[0]
    kept = np.ones(init_r, bool) if kept is None else np.asarray(kept, bool)
    if kept.shape != (init_r,) or int(kept.sum()) != rank:
        raise ValueError(f"{where}: lora_E {e.shape} does not fit init_r={init_r} with "
                         f"{int(kept.sum())} of {kept.size} triplets kept by rank_pattern")
    if e.shape != (rank, 1) or a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank \
            or b.shape[1] != rank:
        raise ValueError(f"{where}: lora_A {a.shape}, lora_E {e.shape} and lora_B {b.shape} "
                         f"do not share a rank")
    full = {"lora_A": np.zeros((init_r, a.shape[1]), np.float32),
            "lora_E": np.zeros((init_r, 1), np.float32),
            "lora_B": np.zeros((b.shape[0], init_r), np.float32)}
    full["lora_A"][kept], full["lora_E"][kept], full["lora_B"][:, kept] = a, e, b
    return full


def import_adalora_peft(directory: str, model, params) -> tuple[AdaLoRA, dict]:
    """``(AdaLoRA method, params with its leaves)`` from a PEFT AdaLoRA adapter for ``model``.
    ``params`` are the base weights (AdaLoRA leaves in them are replaced); ``modules_to_save``
    weights replace theirs and train (``also_train``). Triplets a ``rank_pattern`` dropped come
    back as zeros at full rank (the same function). An adapter that does not fit the model is
    a one-line error naming the tensor and the shapes."""
    adapter = peft_format.read_adapter(directory, (PEFT_TYPE,),
                                       {"fan_in_fan_out": False, "bias": "none"})
    config, weights_path = adapter.config, adapter.weights_path
    flat = strip_leaves(tree.flatten(params))
    tree.check_same_structure(model.param_shapes(), tree.unflatten(flat))
    found = peft_format.sort_tensors(adapter, model, flat, PEFT_PARTS,
                                     holding="AdaLoRA lora_A / lora_E / lora_B")
    method = AdaLoRA(
        targets=peft_format.exact_rules(found.adapted), init_r=int(config.get("init_r", 12)),
        target_r=int(config.get("target_r", 8)), tinit=int(config.get("tinit", 0)),
        tfinal=int(config.get("tfinal", 0)), delta_t=int(config.get("deltaT", 1)),
        total_step=config.get("total_step"), beta1=float(config.get("beta1", 0.85)),
        beta2=float(config.get("beta2", 0.85)),
        orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        also_train=peft_format.exact_rules(found.saved))
    pattern = config.get("rank_pattern") or {}
    for path, target in method.plan(tree.unflatten(flat)).items():
        module, parts = found.adapted[path]
        leaves = _full_rank(parts, pattern.get(f"{module}.lora_E"), method.init_r,
                            f"{weights_path}: adapter module {module!r}")
        shapes, n_in = target.shapes(method.init_r), target.input_axes
        want = {"lora_A": (method.init_r, math.prod(target.shape[:n_in])),
                "lora_B": (math.prod(target.shape[n_in:]), method.init_r)}
        for part, shape in want.items():
            if leaves[part].shape != shape:
                raise ValueError(f"{weights_path}: adapter module {module!r}: {part} (at "
                                 f"init_r) {leaves[part].shape} does not fit this model's "
                                 f"{path} {target.shape}, which needs {shape}")
        flat[target.leaf(A)] = found.names[path][1].to_ours(leaves["lora_A"], shapes[A])
        flat[target.leaf(E)] = leaves["lora_E"].reshape(shapes[E])
        flat[target.leaf(B)] = hf.linear(1).to_ours(leaves["lora_B"], shapes[B])
    flat.update(peft_format.load_saved(found.saved, found.names, flat, weights_path))
    return method, jax.tree.map(jnp.asarray, tree.unflatten(flat))
