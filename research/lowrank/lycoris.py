"""What the LyCORIS tuners PEFT ships (LoHa, :mod:`research.lowrank.loha`; LoKr,
:mod:`research.lowrank.lokr`) share: target planning, ``x·(W + ΔW)`` at each adapted layer, the
fold on export, and PEFT's on-disk format both ways.

Both learn, beside each chosen kernel, a few factors that make a full-size update ``ΔW`` (a
Hadamard product of two low-rank matrices, or a Kronecker product), scaled by
``alpha / r``. As in PEFT 0.21, the factors live in torch's 2-D ``[out, in]`` frame of the layer
(``out`` and ``in`` the products of the kernel's output and input axes), under PEFT's names
(``hada_w1_a``, ``lokr_w2``...), so a PEFT file's tensors are our leaves as they are. ``ΔW`` is
formed in that frame and put in the kernel's layout by :func:`research.models.hf.linear`, the
layout every zoo kernel has in ``transformers`` (query ``[embed, heads, head_dim]`` is torch's
``[heads*head_dim, embed]`` transposed).

In the step, :meth:`Lycoris.apply` intercepts each adapted layer and computes
``x·(W + ΔW) + b``, forming ``ΔW`` per layer and per call in the layer's compute dtype: one
kernel-sized matrix per layer, cheap beside the matmuls of a batch. PEFT adds a second matmul
``x·ΔW`` to the layer's own; one matmul on the sum is the same function at about 0.6 of the
step's FLOPs. :meth:`Lycoris.export`
folds ``W + ΔW`` into the kernels. PEFT's ``rank_dropout`` and ``module_dropout`` are accepted
at 0 only. The PEFT folder is read and written through :mod:`research.peft_format`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from research import peft_format, sites, tree
from research.lowrank.lora import DEFAULT_INPUT_AXES
from research.methods import Applied, Method
from research.models import hf
from research.peft_format import KEY_PREFIX


@dataclasses.dataclass(frozen=True)
class Target:
    """What :meth:`Lycoris.plan` decided for one kernel."""
    path: str
    rank: int
    alpha: float
    input_axes: int
    shape: tuple

    @property
    def module(self) -> str:
        return sites.parent(self.path)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[:self.input_axes])

    @property
    def fan_out(self) -> int:
        return math.prod(self.shape[self.input_axes:])

    def factor(self, name: str) -> str:
        return sites.join(self.module, name)


def kaiming_uniform(key, shape: tuple, dtype):
    """torch's ``kaiming_uniform_(a=sqrt(5))`` on a 2-D ``[rows, fan_in]`` tensor:
    ``U(±1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, dtype, -bound, bound)



@dataclasses.dataclass(frozen=True)
class Lycoris(Method):
    """Options shared by LoHa and LoKr (``config.method = dict(name='loha', ...)``).

    targets: ordered ``(regex, rank)`` rules over kernel paths, first match wins; rank None
        leaves a matched kernel alone, so an exclusion can precede a broad rule (PEFT's ``r``
        and ``rank_pattern``).
    alpha: the scale numerator, ``scale = alpha / r`` (default 8 as in PEFT); ``alpha_rules``
        are ``(regex, alpha)`` rules over the targets (PEFT's ``alpha_pattern``).
    init_weights: PEFT's: True zeroes one factor so the model starts unchanged; False draws
        every factor at random (for tests); LoKr also takes 'lycoris'.
    rank_dropout, module_dropout: PEFT's; only 0.0 is supported.
    also_train: extra path regexes that train (a classifier head); ``trainable``, when given,
        replaces the default (the factors plus ``also_train``).
    input_axes: ``(regex, n)`` rules saying how many leading kernel axes are inputs (default 1;
        the zoo's attention output has 2).
    """

    targets: tuple = ()
    alpha: float = 8.0
    alpha_rules: tuple = ()
    init_weights: bool | str = True
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    also_train: tuple = ()
    input_axes: tuple = DEFAULT_INPUT_AXES

    title: ClassVar[str] = ""          # in messages: 'LoHa'
    peft_type: ClassVar[str] = ""      # PEFT's: 'LOHA'
    factor_names: ClassVar[tuple] = ()  # every leaf name the method may put beside a kernel
    named_inits: ClassVar[tuple] = ()   # init_weights strings besides True / False

    def __post_init__(self):
        set_ = object.__setattr__
        for name in ("targets", "alpha_rules", "input_axes"):
            set_(self, name, tree.rule_tuples(getattr(self, name)))
        set_(self, "also_train", tuple(self.also_train or ()))
        if not self.targets:
            raise ValueError(f"config.method.targets: {self.title} needs (regex, rank) rules "
                             f"over kernel paths")
        for rule in self.targets:
            if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
                raise ValueError(f"config.method.targets: {rule!r} is not a (regex, rank) rule")
            rank = rule[1]
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                                     or rank < 1):
                raise ValueError(f"config.method.targets: {self.title} rule {rule[0]!r} has "
                                 f"rank {rank!r}; ranks are integers >= 1 (None leaves a "
                                 f"matched kernel alone)")
        if not (isinstance(self.init_weights, bool) or self.init_weights in self.named_inits):
            raise ValueError(f"config.method.init_weights={self.init_weights!r} is not one of "
                             f"{[True, False, *self.named_inits]}")
        for name in ("rank_dropout", "module_dropout"):
            if getattr(self, name) != 0:
                raise ValueError(f"config.method.{name}={getattr(self, name)!r}: {self.title} "
                                 f"supports only 0.0")
        set_(self, "trainable", (self.factor_pattern(), *self.also_train)
             if self.trainable is None else tuple(self.trainable))

    # --- what a method defines -------------------------------------------------------------

    def factor_shapes(self, target: Target) -> dict[str, tuple]:
        """``{factor name: shape}`` beside ``target``."""
        raise NotImplementedError

    def zero_factors(self) -> set[str]:
        """The factors ``init`` sets to zero (the others are ``kaiming_uniform``)."""
        raise NotImplementedError

    def delta_weight(self, factors: dict, scale: float):
        """``ΔW`` in torch's ``[out, in]`` frame from the factors beside one kernel."""
        raise NotImplementedError

    def peft_options(self) -> dict:
        """The method's own keys of PEFT's adapter config."""
        return {}

    @classmethod
    def options_from_peft(cls, config: dict) -> dict:
        """Constructor options from the method's own keys of PEFT's adapter config."""
        del config
        return {}

    # --- which kernels, which ranks --------------------------------------------------------

    def factor_pattern(self) -> str:
        return rf"(.*/)?({'|'.join(self.factor_names)})"

    def strip_factors(self, flat: dict) -> dict:
        return {p: v for p, v in flat.items() if sites.leaf(p) not in self.factor_names}

    def plan(self, params) -> dict[str, Target]:
        """``{kernel path: Target}`` for ``params`` (arrays or shapes). A rule matching no
        kernel, or input axes leaving no output axis, is a one-line error."""
        flat = self.strip_factors(tree.flatten(params))
        kernels = [p for p in flat if sites.leaf(p) == "kernel"]
        ranks = tree.resolve_rules(self.targets, kernels, what=f"{self.title} target rule")
        chosen = [p for p in kernels if ranks[p] is not None]
        if not chosen:
            raise ValueError(f"config.method.targets: {self.title}'s rules leave no kernel "
                             f"adapted")
        alphas = tree.resolve_rules(self.alpha_rules, chosen, default=self.alpha,
                                    what=f"{self.title} alpha rule")
        inputs = tree.resolve_rules(self.input_axes, chosen, default=1, require_match=False)
        plan = {}
        for path in chosen:
            shape, n_in = tuple(flat[path].shape), int(inputs[path])
            if not 0 < n_in < len(shape):
                raise ValueError(f"{self.title} target {path} {shape}: {n_in} input axes leave "
                                 f"no output axis (config.method.input_axes)")
            plan[path] = Target(path, int(ranks[path]), float(alphas[path]), n_in, shape)
        return plan

    def factors_at(self, flat: dict, target: Target) -> dict:
        """``{name: factor}`` beside ``target`` in ``flat`` (empty when it has none); factors
        that are not exactly the method's set at its shapes are a one-line error."""
        have = {n: flat[target.factor(n)] for n in self.factor_names
                if target.factor(n) in flat}
        if not have:
            return {}
        want = self.factor_shapes(target)
        shapes = {n: tuple(v.shape) for n, v in have.items()}
        if shapes != want:
            raise ValueError(f"{self.title} factors at {target.module} are {shapes}; "
                             f"{target.path} {target.shape} at rank {target.rank} needs {want}")
        return have

    # --- the Method interface --------------------------------------------------------------

    def init(self, rng, params: dict, stats=None) -> dict:
        """``params`` with factors beside every target (factors already there are kept)."""
        del stats
        flat = dict(tree.flatten(params))
        zero = self.zero_factors()
        for index, target in enumerate(self.plan(params).values()):
            if self.factors_at(flat, target):
                continue
            dtype = flat[target.path].dtype
            keys = jax.random.split(jax.random.fold_in(rng, index), len(self.factor_names))
            for key, (name, shape) in zip(keys, self.factor_shapes(target).items()):
                flat[target.factor(name)] = (jnp.zeros(shape, dtype) if name in zero
                                             else kaiming_uniform(key, shape, dtype))
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """Factors are small and in torch's flattened frame: replicated (no axis names)."""
        flat_logical, flat_shapes = dict(tree.flatten(logical)), tree.flatten(shapes)
        for target in self.plan(shapes).values():
            for name, factor in self.factors_at(flat_shapes, target).items():
                flat_logical[target.factor(name)] = (None,) * len(factor.shape)
        return tree.unflatten(flat_logical)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """``module.apply`` with every adapted layer computing ``x·(W + ΔW) + b``."""
        by_module = {t.module: (t.scale, t.input_axes)
                     for t in self.plan(variables["params"]).values()}
        if getattr(getattr(module, "config", None), "scan_layers", False):
            by_module = tree.with_layer_view(by_module, what=f"the {self.title} scale")

        def add_delta(call: sites.Call):
            scale, n_in = by_module[call.path]
            present = [n for n in self.factor_names if call.has(n)]
            if not present:
                raise ValueError(f"{self.title} target {call.path} has no factors; "
                                 f"{self.title}.init adds them")
            if call.input_axes != n_in:
                raise ValueError(f"{self.title} target {call.path}: its layer contracts "
                                 f"{call.input_axes} input axes, the plan says {n_in} "
                                 f"(config.method.input_axes)")
            dtype = call.dtype(call.param(present[0]))
            delta = self.delta_weight({n: call.param(n).astype(dtype) for n in present}, scale)
            kernel = call.param("kernel")
            kernel = kernel.astype(dtype) + hf.linear(n_in).to_ours(delta, kernel.shape)
            # One matmul on W + ΔW, not x·W + x·ΔW: ΔW is full-size either way, and its
            # gradient is then the one weight gradient of that matmul (a LoHa / LoKr step
            # costs about a full fine-tuning step, where the sum cost 1.6 of one).
            y = jnp.tensordot(call.inputs.astype(dtype), kernel, n_in)
            return y + call.param("bias").astype(dtype) if call.has("bias") else y

        with sites.intercept(add_delta, sites.at(by_module)):
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """The base with ``W + ΔW`` folded into every adapted kernel, factors dropped."""
        flat = dict(tree.flatten(params))
        with jax.default_matmul_precision("highest"):
            for path, target in self.plan(params).items():
                factors = self.factors_at(flat, target)
                if not factors:
                    continue
                delta = self.delta_weight(
                    {n: jnp.asarray(f, jnp.float32) for n, f in factors.items()}, target.scale)
                kernel = flat[path]
                flat[path] = (kernel + hf.linear(target.input_axes).to_ours(
                    delta, target.shape)).astype(kernel.dtype)
                for name in factors:
                    del flat[target.factor(name)]
        return tree.unflatten(flat)


# ---------------------------------------------------------------------------------------------
# PEFT's on-disk format
# ---------------------------------------------------------------------------------------------


def export_lycoris_peft(method: Lycoris, params, model, directory: str, *,
                        base_model_name_or_path: str | None = None) -> dict:
    """Write ``params``' LoHa / LoKr factors (and the ``also_train`` modules, as PEFT's
    ``modules_to_save``) as a PEFT adapter for ``model``'s ``transformers`` class, atomically.
    Returns the adapter config written."""
    what = f"export_lycoris_peft ({method.title})"
    flat = tree.flatten(params)
    plan = {p: t for p, t in method.plan(params).items() if method.factors_at(flat, t)}
    if not plan:
        raise ValueError(f"{what}: params hold no {method.title} factors")
    base = method.strip_factors(flat)
    tree.check_same_structure(model.param_shapes(), tree.unflatten(base))
    names = peft_format.hf_names(model, base)

    tensors, ranks, alphas = {}, {}, {}
    for path, target in plan.items():
        name, layout = names[path]
        module = peft_format.weight_module(name, path)
        peft_format.check_linear(what, path, target.shape, layout, target.input_axes)
        for factor, value in method.factors_at(flat, target).items():
            tensors[f"{KEY_PREFIX}{module}.{factor}"] = np.asarray(value, np.float32)
        ranks[module], alphas[module] = target.rank, target.alpha

    saved, saved_tensors = peft_format.modules_to_save(
        method.also_train, base, names, ranks, what=what, carries="factors")
    tensors.update(saved_tensors)
    candidates = set(peft_format.adaptable_modules(names)) - set(saved)
    rank, alpha = peft_format.most_common(ranks), peft_format.most_common(alphas)
    config = {
        "peft_type": method.peft_type, "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "alpha": alpha,
        "rank_pattern": {peft_format.pattern_key(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {peft_format.pattern_key(m): a for m, a in alphas.items()
                          if a != alpha},
        "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
        "target_modules": peft_format.target_modules(set(ranks), candidates),
        "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        "modules_to_save": saved or None, "init_weights": method.init_weights,
        "inference_mode": True, "revision": None, **method.peft_options(),
    }
    peft_format.write_adapter(directory, config, tensors)
    return config


def _methods() -> dict[str, type[Lycoris]]:
    # Imported here, not at the top: loha and lokr import this module.
    from research.lowrank.loha import LoHa
    from research.lowrank.lokr import LoKr
    return {cls.peft_type: cls for cls in (LoHa, LoKr)}


def import_lycoris_peft(directory: str, model, params) -> tuple[Lycoris, dict]:
    """``(LoHa or LoKr method, params with factors)`` from a PEFT LoHa / LoKr adapter for
    ``model``, the kind read off ``peft_type``. ``params`` are the base weights (factors already
    in them are replaced); ``modules_to_save`` weights replace theirs and train
    (``also_train``). A tensor that does not fit the model is a one-line error naming it."""
    known = _methods()
    adapter = peft_format.read_adapter(directory, tuple(known),
                                       {"rank_dropout": 0.0, "module_dropout": 0.0})
    config, weights_path = adapter.config, adapter.weights_path
    cls = known[config["peft_type"]]
    every_factor = {name for kind in known.values() for name in kind.factor_names}
    flat = {p: v for p, v in tree.flatten(params).items() if sites.leaf(p) not in every_factor}
    tree.check_same_structure(model.param_shapes(), tree.unflatten(flat))
    found = peft_format.sort_tensors(adapter, model, flat, cls.factor_names,
                                     holding=f"{cls.title} factors")

    ranks, alphas = {}, {}
    for path, (module, _) in found.adapted.items():
        ranks[path] = peft_format.pattern_value(config.get("rank_pattern"), module,
                                                config.get("r", 8))
        alphas[path] = float(peft_format.pattern_value(config.get("alpha_pattern"), module,
                                                       config.get("alpha", 8)))
        if isinstance(ranks[path], bool) or not isinstance(ranks[path], int) or ranks[path] < 1:
            raise ValueError(f"{weights_path}: module {module!r} has rank {ranks[path]!r} "
                             f"(r / rank_pattern); ranks are integers >= 1")
    alpha = peft_format.most_common(alphas)
    method = cls(targets=peft_format.value_rules(ranks), alpha=alpha,
                 alpha_rules=peft_format.value_rules(
                     {p: a for p, a in alphas.items() if a != alpha}),
                 init_weights=config.get("init_weights", True),
                 also_train=peft_format.exact_rules(found.saved),
                 **cls.options_from_peft(config))
    for path, target in method.plan(tree.unflatten(flat)).items():
        module, parts = found.adapted[path]
        have = {n: tuple(v.shape) for n, v in parts.items()}
        want = method.factor_shapes(target)
        if have != want:
            raise ValueError(f"{weights_path}: adapter module {module!r} holds {have}; this "
                             f"model's {path} {target.shape} at r={target.rank} needs {want}")
        for name, value in parts.items():
            flat[target.factor(name)] = np.asarray(value, np.float32)
    flat.update(peft_format.load_saved(found.saved, found.names, flat, weights_path))
    return method, jax.tree.map(jnp.asarray, tree.unflatten(flat))
