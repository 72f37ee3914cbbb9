"""PortLLM (Khan et al., 2024, "PortLLM: Personalizing Evolving Large Language Models with
Training-Free and Portable Model Patches"): what fine-tuning added to a base is a *patch* that
carries over, without training, to an updated version of that base.

A patch is a tree of deltas: ``finetuned - old base`` (dense), or ``s·A·B`` at each kernel a
LoRA adapter touched. Leaves the old base lacks (a task head) travel as their values.
:func:`port` adds every delta, scaled by ``(regex, scale)`` rules, to the new base's leaf at its
path, and inserts the leaves the new base lacks as they are.
"""

from __future__ import annotations

import jax.numpy as jnp

from research import tree
from research.lowrank import lora as lora_lib


def _shape(leaf) -> tuple:
    return tuple(jnp.shape(leaf))


def _float32(leaf):
    # Deltas and sums in at least float32: a bfloat16 delta would lose most of a small update.
    return jnp.asarray(leaf, jnp.promote_types(jnp.asarray(leaf).dtype, jnp.float32))


def patch_from_finetune(finetuned, old_base) -> dict:
    """``finetuned - old_base`` at every leaf; leaves only ``finetuned`` has are kept as values."""
    flat_ft, flat_old = tree.flatten(finetuned), tree.flatten(old_base)
    factors = lora_lib.factor_pairs(flat_ft)
    if factors:
        raise ValueError(f"finetuned has LoRA factors at {next(iter(factors.values())).module}; "
                         f"take its patch with patch_from_lora")
    patch = {}
    for path, old in flat_old.items():
        if path not in flat_ft:
            raise ValueError(f"finetuned has no {path!r}, which old_base has")
        if _shape(flat_ft[path]) != _shape(old):
            raise ValueError(f"{path}: finetuned {_shape(flat_ft[path])} vs old_base "
                             f"{_shape(old)}")
        patch[path] = _float32(flat_ft[path]) - _float32(old)
    patch.update({path: leaf for path, leaf in flat_ft.items() if path not in flat_old})
    return tree.unflatten(patch)


def patch_from_lora(params, method: lora_lib.LoRA, *, old_base=None) -> dict:
    """The dense ``s·A·B`` at each kernel ``method``'s factors in ``params`` adapt, plus the other
    leaves ``method`` trains (a classifier head, ``also_train``) as they are, or as deltas from
    ``old_base`` where it has them. Frozen leaves are not in the patch."""
    if type(method) is not lora_lib.LoRA or method.init_weights not in lora_lib.RANDOM_INITS:
        raise ValueError(f"patch_from_lora takes a plain LoRA adapter, got "
                         f"{type(method).__name__}(init_weights={method.init_weights!r}); "
                         f"merge it and use patch_from_finetune, or lora.to_plain_lora first")
    flat = tree.flatten(params)
    pairs = lora_lib.factor_pairs(flat)
    if not pairs:
        raise ValueError("params has no LoRA factors (lora_a / lora_b leaves)")
    adapter, scales = lora_lib.lora_factors(params, method)
    # Merging into zero kernels gives exactly s·A·B, with lora.merge's own contraction.
    zeros = {path: jnp.zeros(_shape(flat[path]), jnp.float32) for path in pairs}
    patch = tree.flatten(lora_lib.merge(tree.unflatten({**zeros, **tree.flatten(adapter)}),
                                        scales))
    trained = tree.flatten(tree.mask_from_patterns(method.trainable, params,
                                                   what="LoRA trainable pattern"))
    flat_old = tree.flatten(old_base) if old_base is not None else {}
    adapted = set(pairs) | set(tree.flatten(adapter))
    for path in (p for p, is_trained in trained.items() if is_trained and p not in adapted):
        if path in flat_old:
            if _shape(flat_old[path]) != _shape(flat[path]):
                raise ValueError(f"{path}: params {_shape(flat[path])} vs old_base "
                                 f"{_shape(flat_old[path])}")
            patch[path] = _float32(flat[path]) - _float32(flat_old[path])
        else:
            patch[path] = flat[path]
    return tree.unflatten(patch)


def port(new_base, patch, *, scale: float = 1.0, rules=None) -> dict:
    """``new_base + scale · patch`` leaf by leaf, in the new base's dtypes. ``rules``:
    ``(regex, scale)`` over the patch's paths, first match wins (``scale`` elsewhere). Patch
    leaves the new base lacks are inserted as they are (a scale of 0 leaves them out)."""
    flat_new, flat_patch = tree.flatten(new_base), tree.flatten(patch)
    scales = tree.resolve_rules(rules or (), flat_patch, default=scale, what="PortLLM scale rule")
    ported = dict(flat_new)
    for path, delta in flat_patch.items():
        s = scales[path]
        if path not in flat_new:
            if s:
                ported[path] = delta
            continue
        base = flat_new[path]
        if _shape(base) != _shape(delta):
            raise ValueError(f"PortLLM patch at {path} has shape {_shape(delta)}; the new base "
                             f"has {_shape(base)}")
        if s:
            ported[path] = (_float32(base) + s * _float32(delta)).astype(jnp.asarray(base).dtype)
    return tree.unflatten(ported)
