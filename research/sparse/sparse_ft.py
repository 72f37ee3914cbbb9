"""Sparse fine-tuning: train only the entries a mask selects, as a sparse delta beside θ0.

The retraining phase of LT-SFT (Ansell et al., 2022, "Composable Sparse Fine-Tuning for
Cross-Lingual Transfer"), and any fixed-mask training. The mask comes from a sparse-delta
file (its entries; its values are ignored, so training starts at θ0). The method adds, under
``sparse/<leaf path>/``, the flat ``index`` of the selected entries (frozen, int32) and their
``value`` (trainable, zero at the start), and the forward pass scatter-adds the values into
the frozen leaves. So entries outside the mask are never written (bit-identical by
construction, not by zeroed gradients), the optimizer holds state for the K selected entries
only, and the trained run *is* the sparse delta.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from research import tree as tree_lib
from research.methods import Applied, Method, register
from research.sparse import delta as delta_lib
from research.sparse import masks as masks_lib

PREFIX = "sparse"


@register("sparse")
@dataclasses.dataclass(frozen=True)
class SparseFT(Method):
    """``config.method = dict(name='sparse', mask='mask.safetensors', dense=(regex, ...))``.

    mask: a sparse-delta file (:mod:`research.sparse.delta`) whose entries may train.
    dense: path regexes of leaves that train whole, beside the sparse entries (the task head,
        which LT-SFT trains fully); they may not overlap the mask.
    """

    mask: str = ""
    dense: tuple = ()

    def __post_init__(self):
        if not self.mask:
            raise ValueError("config.method.mask: the sparse method needs a sparse-delta file "
                             "naming the entries that train")
        try:
            loaded = delta_lib.load(self.mask)
        except FileNotFoundError:
            raise ValueError(f"config.method.mask={self.mask!r}: no such file") from None
        object.__setattr__(self, "dense", tuple(self.dense or ()))
        object.__setattr__(self, "_entries", loaded)
        object.__setattr__(self, "trainable", (f"{PREFIX}/.*/value", *self.dense))

    @property
    def entries(self) -> delta_lib.SparseDelta:
        return self._entries

    def init(self, rng, params: dict, stats=None) -> dict:
        del rng, stats
        delta_lib.check_base(self.entries, delta_lib.shapes_of(params), "the model's params")
        flat = tree_lib.flatten(params)
        dense = tree_lib.resolve_rules([(p, True) for p in self.dense], flat, default=False,
                                       what="config.method.dense rule")
        added = {}
        for path, index in self.entries.indices.items():
            if dense[path]:
                raise ValueError(f"config.method.dense trains {path!r} whole, but the mask "
                                 "also selects entries of it")
            added[f"{PREFIX}/{path}/index"] = jnp.asarray(index, jnp.int32)
            added[f"{PREFIX}/{path}/value"] = jnp.zeros(index.shape, flat[path].dtype)
        return tree_lib.unflatten({**flat, **added})

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        flat = dict(tree_lib.flatten(logical))
        for path in tree_lib.flatten(shapes):
            if path.startswith(PREFIX + "/"):
                flat[path] = (None,)  # a few scattered entries: replicated
        return tree_lib.unflatten(flat)

    def model_params(self, params: dict) -> dict:
        """The model's params with the trained entries added in (θ0 + φ)."""
        flat = tree_lib.flatten(params)
        model = {p: v for p, v in flat.items() if not p.startswith(PREFIX + "/")}
        for path in self.entries.indices:
            leaf = jnp.asarray(model[path])
            index, value = flat[f"{PREFIX}/{path}/index"], flat[f"{PREFIX}/{path}/value"]
            model[path] = leaf.reshape(-1).at[index].add(value).reshape(leaf.shape)
        return tree_lib.unflatten(model)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        return Applied(module.apply(
            {**variables, "params": self.model_params(variables["params"])}, *args, **kwargs))

    def export(self, params: dict) -> dict:
        return self.model_params(params)

    def sparse_delta(self, params: dict, base: dict) -> delta_lib.SparseDelta:
        """The trained update as one sparse delta over the model's leaves: the masked entries'
        values, plus the ``dense`` leaves' change from ``base`` (θ0) at full density."""
        flat = tree_lib.flatten(params)
        model = tree_lib.unflatten({p: v for p, v in flat.items()
                                    if not p.startswith(PREFIX + "/")})
        sparse = delta_lib.SparseDelta(
            delta_lib.shapes_of(model), dict(self.entries.indices),
            {p: np.asarray(flat[f"{PREFIX}/{p}/value"]) for p in self.entries.indices})
        dense = masks_lib.from_rules([(p, True) for p in self.dense], model,
                                     what="config.method.dense rule")
        return delta_lib.compose(sparse, delta_lib.difference(model, base, dense))
