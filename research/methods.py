"""The one seam through which a method enters a training run.

A method may (1) add leaves of its own beside the model's (LoRA factors beside kernels, a mask,
a prompt), with logical axes for sharding, optionally from statistics of a few training batches
(CorDA's input covariances); (2) name the leaves that train by default; (3) wrap
``module.apply`` to use its leaves at named sites of the blocks (Flax method interception), so
model code never knows about it; and (4) add terms to the training loss (a regulariser, a
distillation loss). Plain fine-tuning does none of this.
``config.method.name`` picks the method; the rest of ``config.method`` are its options.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import ClassVar

# name -> "module:factory"; a new method adds its file and one line here, never a loop change.
REGISTRY = {
    "full": "research.methods:Method",
    "lora": "research.lowrank.lora:LoRA",
    "dora": "research.lowrank.dora:DoRA",
    "pela": "research.lowrank.pela:PELA",
    "pego": "research.lowrank.pego:PEGO",
    "dept": "research.lowrank.dept:DePT",
    "multi_lora": "research.lowrank.adapters:MultiLoRA",
    "sparse": "research.sparse.sparse_ft:SparseFT",
    "bitfit": "research.sparse.selection:bitfit",
    "ln_tuning": "research.sparse.selection:ln_tuning",
    "lightweight": "research.sparse.selection:lightweight",
    "last_layer": "research.sparse.selection:last_layer",
    "hft": "research.sparse.hft:HFT",
    "green": "research.sparse.green:GreenTrainer",
    "s2ft": "research.sparse.s2ft:S2FT",
    "graft": "research.sparse.learned_masks:Graft",
    "mask_tuning": "research.sparse.learned_masks:MaskTuning",
    "subspace": "research.sparse.subspace:Subspace",
    "sparse_reg": "research.sparse.prune:SparseRegularised",
}


@dataclasses.dataclass(frozen=True)
class Method:
    """Full fine-tuning: no extra leaves, everything trains, plain apply."""

    trainable: tuple[str, ...] | None = None  # path regexes; None: every leaf
    calibration_batches: int = 0  # training batches ``calibrate`` reads before ``init``
    # Whether the method runs under ``model.scan_layers``, where one traced block stands for
    # every layer: true when its ``apply`` ignores layer paths or reads them through
    # ``layers.module_path`` and a layer view (LoRA); false for methods keyed by layer path.
    scannable: ClassVar[bool] = True

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

    def apply(self, module, variables, *args, **kwargs):
        return module.apply(variables, *args, **kwargs)

    def apply_with_losses(self, module, variables, *args, **kwargs):
        """``(outputs, {name: scalar})`` for a training step: the loop adds each scalar (already
        weighted, a mean over the batch) to the task's mean loss and logs it as ``train/name``."""
        return self.apply(module, variables, *args, **kwargs), {}


def build(config) -> Method:
    """The method ``config.name`` with the other keys of ``config`` as options."""
    options = dict(config or {})
    name = options.pop("name", "full")
    if name not in REGISTRY:
        raise ValueError(f"config.method.name={name!r} is not one of {sorted(REGISTRY)}")
    module_name, factory = REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module_name), factory)(**options)
    except TypeError as err:
        raise ValueError(f"config.method for {name!r}: {err}") from None
