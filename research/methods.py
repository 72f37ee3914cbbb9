"""The one seam through which a method enters a training run.

A method's life in a run, each step one method of :class:`Method`:

1. ``prepare(context)`` on the host, before any shape is known: what the method must decide
   from the run itself (GreenTrainer ranks tensors on a few batches; grafting reads the
   fine-tuned run's checkpoint). Returns the configured method.
2. ``calibrate`` and ``init`` (pure, traced): the method's own leaves beside the model's
   (LoRA factors beside kernels, a mask, a prompt), optionally from statistics of a few
   training batches (CorDA's input covariances); ``logical_axes`` shards them.
3. ``trainable_for``: the leaves that train by default.
4. ``apply``: the model's outputs with the method's leaves used at named sites of the blocks
   (:mod:`research.sites`), so model code never knows about it, plus loss terms (a
   regulariser, a distillation loss), which the loop adds to the task loss, and metrics, which
   it only logs. The loop reads both in training steps only; a method may skip costly ones
   outside training (``deterministic=False`` marks a training call: :func:`training`).
5. ``init_state`` and ``after_update``: a method that learns beside the optimizer keeps a
   running state in the train state (``method_state``, checkpointed; an empty one, the
   default, adds no key) and, inside the jitted step right after the optimizer's update,
   reads that step's gradients to change its trainable leaves and its state (AdaLoRA's
   importance averages, and its least important singular values masked to zero).
6. ``export(params)``: plain model params with the method folded in (LoRA merged, the grafted
   model), keeping only the leaves that cannot fold (a prompt). ``init_from``, the analysis
   tools and the HF exporter read runs through it.

Methods register under a name with :func:`register`; ``config.method.name`` picks one and the
rest of ``config.method`` are its options. A new method is one new file in a family folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

# The packages whose modules define methods: every module in them is imported on first lookup,
# so a method's file registering itself is all it takes.
FAMILIES = ("research.lowrank", "research.sparse", "research.adapters")
_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str):
    """Class or factory decorator: ``config.method.name=name`` builds it."""
    def add(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"method name {name!r} is registered twice: by "
                             f"{_REGISTRY[name].__module__} and {factory.__module__}")
        _REGISTRY[name] = factory
        return factory
    return add


def registry() -> dict[str, Callable[..., Method]]:
    """``{name: factory}`` of every method (importing the families' modules once)."""
    for family in FAMILIES:
        package = importlib.import_module(family)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{family}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


class Applied(NamedTuple):
    """What :meth:`Method.apply` returns: the model's outputs, loss terms (each already
    weighted, a mean over the batch; the loop adds them to the task's mean loss) and metrics
    (logged as ``train/NAME``, never differentiated)."""
    outputs: Any
    losses: dict = {}
    metrics: dict = {}


def training(kwargs) -> bool:
    """Whether an ``apply`` call is a training step: the loop passes ``deterministic=False``."""
    return kwargs.get("deterministic", True) is False


@dataclasses.dataclass(frozen=True)
class Context:
    """What ``prepare`` may read of the run, all lazily (a method that needs none pays none).

    config: the whole run config. model: the built model (shapes, module, dummy inputs).
    params(): the run's initial model params (pretrained or fresh, as the run would start).
    batches(): a fresh iterator over training batches (its own loader: the run's stream is
    untouched). read_checkpoint(workdir): another run's final params, exported plain.
    """
    config: Any
    model: Any
    params: Callable[[], dict]
    batches: Callable[[], Iterator[dict]]
    read_checkpoint: Callable[[str], dict]


@register("full")
@dataclasses.dataclass(frozen=True)
class Method:
    """Full fine-tuning: no extra leaves, everything trains, plain apply."""

    trainable: tuple[str, ...] | None = None  # path regexes; None: every leaf
    calibration_batches: int = 0  # training batches ``calibrate`` reads before ``init``
    # Whether the method runs under ``model.scan_layers``, where one traced block stands for
    # every layer: true when its ``apply`` ignores layer paths or reads them through
    # ``layers.module_path`` and a layer view (LoRA); false for methods keyed by layer path.
    scannable: ClassVar[bool] = True

    def prepare(self, context: Context) -> Method:
        """The method configured for this run, from what only the run knows (host side)."""
        del context
        return self

    def trainable_for(self, shapes: dict) -> tuple[str, ...] | None:
        """Regexes of the leaves that train, given every leaf's shape (``init``'s output). Most
        methods name them up front; HFT draws its half of the blocks from the tree itself."""
        del shapes
        return self.trainable

    def calibrate(self, module, params: dict, batches: dict):
        """Statistics for ``init`` from ``batches``: model inputs stacked on a leading axis of
        ``calibration_batches``. Pure (runs under ``jax.jit``, and under ``jax.eval_shape``
        with dummy inputs when only shapes are needed)."""
        del module, params, batches
        return None

    def init(self, rng, params: dict, stats=None) -> dict:
        """Params with the method's own leaves added (pure: runs under ``jax.jit``); ``stats``
        is what ``calibrate`` returned."""
        del rng, stats
        return params

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        """Logical axes for every leaf of ``shapes`` (the model's plus the method's)."""
        del shapes
        return logical

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        """The model run with the method: outputs, loss terms and metrics (see :class:`Applied`)."""
        return Applied(module.apply(variables, *args, **kwargs))

    def init_state(self, trainable: dict) -> dict:
        """The method's running state, from the trainable tree (pure: runs under ``jax.jit``
        and ``jax.eval_shape``). The loop keeps it as the train state's ``method_state`` and
        checkpoints it; empty (the default) adds nothing to the state."""
        del trainable
        return {}

    def after_update(self, state: dict, trainable: dict, grads: dict,
                     step) -> tuple[dict, dict]:
        """``(trainable, state)`` after the optimizer's update of one training step: ``grads``
        are that step's gradients of the trainable tree (before the optimizer's clipping),
        ``step`` the traced count of steps done before it (0 in the first). Pure, inside the
        jitted step; a step the loop skips (a non-finite loss) skips this too."""
        del grads, step
        return trainable, state

    def export(self, params: dict) -> dict:
        """Plain model params with the method folded in; leaves that cannot fold are kept."""
        return params


def build(config) -> Method:
    """The method ``config.name`` with the other keys of ``config`` as options (not yet
    prepared: see :meth:`Method.prepare`)."""
    options = dict(config or {})
    name = options.pop("name", "full")
    factories = registry()
    if name not in factories:
        raise ValueError(f"config.method.name={name!r} is not one of {sorted(factories)}")
    try:
        return factories[name](**options)
    except TypeError as err:
        raise ValueError(f"config.method for {name!r}: {err}") from None
