"""The model zoo: BERT, ViT and Llama presets built from one transformer block, with heads.

A model name is ``{preset}_{head}``, e.g. ``minilm_l6_classifier``, ``bert_tiny_mlm``,
``vit_tiny_classifier``, ``llama_tiny_lm``. :func:`build` returns a :class:`Model`: the Flax
module plus what the training loop needs to know about it. Params are plain nested dicts of
float32 arrays; every weight carries logical axis names (see :meth:`Model.logical_axes`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from research import tree
from research.models import bert, llama, vit
from research.models.layers import CONFIG_FIELDS, ModelConfig, make_config

FAMILIES = {"bert": bert, "vit": vit, "llama": llama}


@dataclasses.dataclass(frozen=True)
class Preset:
    family: str
    settings: Mapping[str, Any]  # ModelConfig keywords, the family's architecture included


PRESETS: dict[str, Preset] = {
    name: Preset(family, {**module.ARCHITECTURE, **settings})
    for family, module in FAMILIES.items() for name, settings in module.PRESETS.items()
}
NAMES: tuple[str, ...] = tuple(f"{name}_{head}" for name, preset in PRESETS.items()
                               for head in FAMILIES[preset.family].HEADS)


@dataclasses.dataclass(frozen=True)
class Model:
    """A zoo module and its description. ``newly_initialized`` lists param paths that
    :func:`research.models.hf.load_pretrained` had to initialise fresh (a head the checkpoint
    lacks); it is empty otherwise."""
    module: nn.Module
    config: ModelConfig
    family: str
    head: str
    task: str  # 'classification' | 'masked_lm' | 'causal_lm' | 'encoding' (BERT trunk)
    newly_initialized: tuple[str, ...] = ()

    def dummy_inputs(self, batch_size: int, length: int | None = None) -> dict[str, np.ndarray]:
        """Zero inputs (all-ones attention mask) for init or ``jax.eval_shape``. ``length``
        defaults to a short sequence: parameter shapes do not depend on it."""
        c = self.config
        length = length or min(c.max_length, 128)
        tokens = (batch_size, length)
        examples = {
            "input_ids": np.zeros(tokens, np.int32),
            "attention_mask": np.ones(tokens, np.int32),
            "token_type_ids": np.zeros(tokens, np.int32),
            "image": np.zeros((batch_size, c.image_size, c.image_size, c.num_channels),
                              np.float32),
        }
        return {name: examples[name] for name in self.module.input_names}

    def _boxed_init(self, rng):
        return self.module.init(rng, **self.dummy_inputs(1, 1))["params"]

    def init(self, rng) -> dict:
        """Freshly initialised params: a plain nested dict of float32 arrays."""
        return _plain(nn.unbox(jax.jit(self._boxed_init)(rng)))

    def param_shapes(self) -> dict:
        """``jax.ShapeDtypeStruct`` per param, without allocating anything."""
        return _plain(nn.unbox(jax.eval_shape(self._boxed_init, jax.random.key(0))))

    def logical_axes(self) -> dict:
        """``PartitionSpec`` of logical axis names per param (same tree as the params)."""
        boxed = jax.eval_shape(self._boxed_init, jax.random.key(0))
        return _plain(nn.get_partition_spec(boxed))


def _plain(params) -> dict:
    return tree.unflatten(tree.flatten(params))


def make(family: str, head: str, config: ModelConfig) -> Model:
    """The ``head`` model of ``family`` for an explicit config."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
    heads = FAMILIES[family].HEADS
    if head not in heads:
        raise ValueError(f"unknown head {head!r} for {family}; valid: {', '.join(heads)}")
    module_class, task = heads[head]
    return Model(module_class(config), config, family, head, task)


def build(name: str, **overrides) -> Model:
    """The zoo model ``name`` (one of :data:`NAMES`), with ModelConfig fields overridden."""
    preset_name, _, head = name.rpartition("_")
    preset = PRESETS.get(preset_name)
    if preset is None or head not in FAMILIES[preset.family].HEADS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(NAMES)}")
    return make(preset.family, head, make_config(**{**preset.settings, **overrides}))


__all__ = ["CONFIG_FIELDS", "FAMILIES", "Model", "ModelConfig", "NAMES", "PRESETS", "Preset",
           "build", "make", "make_config"]
