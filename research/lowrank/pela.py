"""PELA (Guo et al., 2024, "PELA: Learning Parameter-Efficient Models with Low-Rank
Approximation"): compress a pretrained model by factorising chosen kernels into low-rank pairs,
then train the compressed model (the student) with feature distillation from the original
(the teacher), so the small model recovers what the truncation lost.

As a tree transform: :meth:`PELA.init` puts ``pela_u`` ``[*inputs, r]`` and ``pela_v``
``[r, *outputs]`` beside each target kernel (the layout of :mod:`research.lowrank.lora`), from
its truncated SVD ``W ≈ U_r S_r V_rᵀ`` with ``sqrt(S_r)`` on each side: by Eckart–Young the best
rank-r approximation. :meth:`PELA.apply` runs the student: every factorised layer computes
``(x·U)·V + b`` and never reads its kernel. :meth:`PELA.apply_with_losses` also runs the teacher
(the kernels, under ``stop_gradient``) and adds ``distill_weight`` times the mean squared
difference of the two models' outputs at the distill sites (default: every encoder layer).
:func:`compress` then drops the kernels: the deployable model, and :func:`parameter_counts`
says how much smaller it is.

Not implemented: PELA's weight-perturbation regulariser, and its separate intermediate
pre-training stage (here distillation runs alongside the task loss).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import sites as sites_lib, tree
from research.lowrank import init as init_lib
from research.lowrank.lora import DEFAULT_INPUT_AXES, low_rank
from research.methods import Applied, Method, register, training

U, V = "pela_u", "pela_v"
FACTOR_PATTERN = r"(.*/)?pela_(u|v)"
DEFAULT_SITES = ((r"encoder/layer_\d+", 1.0),)


def factorised(flat) -> dict[str, tuple[str, str]]:
    """``{module path: (pela_u path, pela_v path)}`` for a flat tree; a factor without its
    partner is an error naming the path."""
    modules = {}
    for path in flat:
        parent, _, name = path.rpartition(tree.SEP)
        if name in (U, V):
            partner = sites_lib.join(parent, V if name == U else U)
            if partner not in flat:
                raise ValueError(f"PELA factor {path!r} has no partner {partner!r}")
            modules[parent] = (sites_lib.join(parent, U), sites_lib.join(parent, V))
    return modules


def factorise(kernel, rank: int, n_in: int = 1):
    """``(U, V)`` in the kernel's layout with ``U·V`` its best rank-``rank`` approximation
    (truncated SVD, ``sqrt(S)`` on each side so neither factor dominates)."""
    u, s, vh = init_lib.truncated_svd(init_lib.as_matrix(kernel, n_in), rank)
    root = jnp.sqrt(s)
    a, b = init_lib.to_factors(u * root, root[:, None] * vh, kernel.shape, n_in)
    return a.astype(kernel.dtype), b.astype(kernel.dtype)


def compress(params) -> dict:
    """The deployable model: every kernel with factors beside it removed (``PELA.apply`` runs
    the result; the teacher, and so training, needs the kernels)."""
    flat = tree.flatten(params)
    kernels = {sites_lib.join(module, "kernel") for module in factorised(flat)}
    return tree.unflatten({p: x for p, x in flat.items() if p not in kernels})


def fold(params) -> dict:
    """The student as plain params: ``kernel = U·V`` at every factorised layer, factors
    dropped (equal outputs: the student computes ``(x·U)·V``)."""
    flat = dict(tree.flatten(params))
    for module, (u_path, v_path) in factorised(flat).items():
        u, v = flat.pop(u_path), flat.pop(v_path)
        kernel = sites_lib.join(module, "kernel")
        dtype = flat[kernel].dtype if kernel in flat else u.dtype
        flat[kernel] = jnp.tensordot(u, v, 1, precision=jax.lax.Precision.HIGHEST).astype(dtype)
    return tree.unflatten(flat)


def parameter_counts(params) -> dict[str, int]:
    """Scalar counts of the original model (the tree without factors) and of the compressed
    one (:func:`compress`), e.g. to report beside accuracy."""
    flat = tree.flatten(params)
    factors = {p for pair in factorised(flat).values() for p in pair}
    return {"original": tree.count({p: x for p, x in flat.items() if p not in factors}),
            "compressed": tree.count(compress(params))}


@register("pela")
@dataclasses.dataclass(frozen=True)
class PELA(Method):
    """PELA options (``config.method = dict(name='pela', ...)``).

    targets: ordered ``(regex, rank)`` rules over kernel paths, first match wins; rank 0 (or
        None) leaves a matched kernel whole, so an exclusion can precede a broad rule.
    distill_weight: weight of the feature-distillation term ``distill`` (0: no teacher pass).
    distill_sites: ``(regex, weight)`` rules over module paths (``encoder/layer_3``); the term
        is the weighted mean over matched sites of the mean squared difference of their outputs.
    also_train: extra path regexes that train; ``trainable``, when given, replaces the default.
        By default only the factors train (PELA updates only the low-rank model): biases, norms
        and embeddings are leaves the teacher shares, so training them would move the teacher
        too. Heads after the last distill site (classifier, pooler) are safe to add here.
    input_axes: ``(regex, n)`` rules saying how many leading kernel axes are inputs.
    """

    scannable: ClassVar[bool] = False  # its sites are keyed by layer path

    targets: tuple = ()
    distill_weight: float = 1.0
    distill_sites: tuple = DEFAULT_SITES
    also_train: tuple = ()
    input_axes: tuple = DEFAULT_INPUT_AXES

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("targets", "distill_sites", "input_axes"):
            set_(self, name, tuple(tuple(r) if isinstance(r, list) else r
                                   for r in (getattr(self, name) or ())))
        set_(self, "also_train", tuple(self.also_train or ()))
        if not self.targets:
            raise ValueError("PELA needs targets: (regex, rank) rules over kernel paths")
        if not self.distill_weight >= 0:
            raise ValueError(f"PELA distill_weight={self.distill_weight!r} is not >= 0")
        set_(self, "trainable", (FACTOR_PATTERN, *self.also_train) if self.trainable is None
             else tuple(self.trainable))

    def plan(self, params) -> dict[str, tuple[int, int]]:
        """``{kernel path: (rank, input axes)}``; rules matching nothing and ranks beyond a
        kernel's smaller side are one-line errors."""
        flat = tree.flatten(params)
        kernels = [p for p in flat if p.rpartition(tree.SEP)[2] == "kernel"]
        ranks = tree.resolve_rules(self.targets, kernels, what="PELA target rule")
        chosen = [p for p in kernels if ranks[p]]
        inputs = tree.resolve_rules(self.input_axes, chosen, default=1, require_match=False)
        for path in chosen:
            init_lib.check_rank(ranks[path], flat[path].shape, int(inputs[path]),
                                f"PELA rank for {path}:")
        return {path: (ranks[path], int(inputs[path])) for path in chosen}

    def sites(self, params) -> dict[str, float]:
        """``{module path: weight}`` of the distill sites, from every module holding params."""
        modules = dict.fromkeys(tree.SEP.join(p.split(tree.SEP)[:i])
                                for p in tree.flatten(params)
                                for i in range(1, p.count(tree.SEP) + 1))
        weights = tree.resolve_rules(self.distill_sites, modules, what="PELA distill site rule")
        for site, weight in weights.items():
            if weight is not None and not weight >= 0:
                raise ValueError(f"PELA distill site {site}: weight {weight!r} is not >= 0")
        chosen = {site: float(weight) for site, weight in weights.items() if weight}
        if not chosen:
            raise ValueError(f"PELA distill_sites {self.distill_sites!r} give every module "
                             f"weight 0; name at least one site or set distill_weight=0")
        return chosen

    # --- the Method interface --------------------------------------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with factors beside every target kernel (factors already present stay)."""
        del rng, stats
        flat = dict(tree.flatten(params))
        for path, (rank, n_in) in self.plan(params).items():
            kernel, module = flat[path], path.rpartition(tree.SEP)[0]
            want = ((*kernel.shape[:n_in], rank), (rank, *kernel.shape[n_in:]))
            u_path, v_path = sites_lib.join(module, U), sites_lib.join(module, V)
            if u_path in flat or v_path in flat:
                have = tuple(tuple(getattr(flat.get(p), "shape", ())) for p in (u_path, v_path))
                if have != want:
                    raise ValueError(f"PELA factors at {module} have shapes {have}; {path} "
                                     f"{tuple(kernel.shape)} at rank {rank} needs {want}")
                continue
            flat[u_path], flat[v_path] = factorise(kernel, rank, n_in)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """U takes the kernel's input axes, V its output axes; the rank axis has no name."""
        flat_logical, flat_shapes = dict(tree.flatten(logical)), tree.flatten(shapes)
        for module, (u_path, v_path) in factorised(flat_shapes).items():
            n_in, n_out = flat_shapes[u_path].ndim - 1, flat_shapes[v_path].ndim - 1
            axes = tuple(flat_logical.get(sites_lib.join(module, "kernel")) or ())
            axes += (None,) * (n_in + n_out - len(axes))
            flat_logical[u_path], flat_logical[v_path] = (*axes[:n_in], None), (None, *axes[n_in:])
        return tree.unflatten(flat_logical)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """The student, every factorised layer computing ``(x·U)·V + b``; in training also
        ``{'distill': distill_weight · feature distance}`` to the teacher, which gets the same
        inputs (and dropout rngs, so both drop the same units)."""
        if not (self.distill_weight and training(kwargs)):
            with sites_lib.intercept(_student, sites_lib.holding(U, V)):
                return Applied(module.apply(variables, *args, **kwargs))
        flat = tree.flatten(variables["params"])
        for name in factorised(flat):
            if sites_lib.join(name, "kernel") not in flat:
                raise ValueError(f"PELA distillation needs the teacher kernel {name}/kernel; "
                                 f"distil before compress()")
        sites = self.sites(variables["params"])
        student, teacher = {}, {}
        with sites_lib.capture(sites, student), \
                sites_lib.intercept(_student, sites_lib.holding(U, V)):
            outputs = module.apply(variables, *args, **kwargs)
        with sites_lib.capture(sites, teacher):
            module.apply(jax.lax.stop_gradient(variables), *args, **kwargs)
        return Applied(outputs, {"distill": self.distill_weight * feature_distance(
            student, teacher, sites)})

    def export(self, params: dict) -> dict:
        """The student as a plain model: each factorised kernel replaced by ``U·V``."""
        return fold(params)


# ---------------------------------------------------------------------------------------------
# The student's layers and the features both models show at the sites
# ---------------------------------------------------------------------------------------------


def _student(call: sites_lib.Call):
    u, v = call.param(U), call.param(V)
    if isinstance(call.layer, nn.Embed):
        raise ValueError(f"PELA factors at {call.path} sit in an Embed; PELA factorises "
                         f"nn.Dense and MultiAxisDense kernels")
    n_in, dtype = call.input_axes, call.dtype(u)
    layer = call.layer
    use_bias = layer.use_bias if isinstance(layer, nn.Dense) else layer.config.use_bias
    if u.ndim - 1 != n_in:
        raise ValueError(f"PELA factor {call.path}/{U} {u.shape} has {u.ndim - 1} input axes; "
                         f"the layer's kernel has {n_in} (set PELA input_axes)")
    # Only the factors are read, so the compressed tree (no kernel) runs too.
    y = low_rank(call.inputs.astype(dtype), u.astype(dtype), v.astype(dtype), n_in, 1.0)
    if use_bias:
        y = y + call.param("bias").astype(dtype)
    return y


def feature_distance(student: dict, teacher: dict, sites: dict[str, float]):
    """Weighted mean over ``sites`` of the mean squared difference of the two models' outputs
    there (float32; padding positions count too: the student should match everywhere)."""
    missing = [site for site in sites if site not in student or site not in teacher]
    if missing:
        raise ValueError(f"PELA distill site {missing[0]!r} holds params but was never called")
    total = 0.0
    for site, weight in sites.items():
        pairs = zip(jax.tree.leaves(student[site]), jax.tree.leaves(teacher[site]))
        errors = [jnp.mean(jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32)))
                  for s, t in pairs]
        total = total + weight * sum(errors) / len(errors)
    return total / sum(sites.values())
