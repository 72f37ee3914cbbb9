"""LN-tuning (Qi et al., 2022, "Parameter-Efficient Tuning on Layer Normalization for Pre-trained
Language Models") in Hugging Face PEFT's format (``peft_type="LN_TUNING"``), both ways.

PEFT keeps a trained copy of each chosen norm and stores it as
``base_model.model.M.ln_tuning_layers.{weight,bias}`` (``M`` the torch norm module; an RMSNorm
has no bias); the task head and other modules that train whole are ``modules_to_save``. Our
``ln_tuning`` method trains the norms' own ``scale`` / ``bias`` in place, so export writes the
trained values there and import puts them back into the norms: the plain model then computes
what PEFT's adapted model computes. Names and layouts come from :mod:`research.peft_format`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from research import peft_format, tree
from research.sparse import selection

PEFT_TYPE = "LN_TUNING"
COPY = "ln_tuning_layers"
NORM_LEAVES = {"scale": "weight", "bias": "bias"}  # ours -> torch's, per norm


def _norm_paths(method, flat: dict) -> list[str]:
    """The norm leaves ``method`` trains (its own rules, not the head or ``also_train``)."""
    chosen = tree.resolve_rules([(rule, True) for rule in method.rules], list(flat),
                                default=False, what=f"{method.name} rule")
    return [path for path, take in chosen.items() if take]


def export_ln_tuning_peft(method: selection.Selection, params, model, directory: str, *,
                          base_model_name_or_path: str | None = None) -> dict:
    """Write the trained norms of ``params`` (and every other leaf ``method`` trains, the head
    included, as ``modules_to_save``) as a PEFT LN-tuning adapter for ``model``'s
    ``transformers`` class, atomically. Returns the adapter config written."""
    if getattr(method, "name", None) != "ln_tuning":
        raise ValueError(f"export_ln_tuning_peft: method {getattr(method, 'name', method)!r} is "
                         f"not 'ln_tuning'")
    flat = tree.flatten(params)
    tree.check_same_structure(model.param_shapes(), params)
    names = peft_format.hf_names(model, flat)
    norms = _norm_paths(method, flat)
    tensors, targets = {}, set()
    for path in norms:
        name, layout = names[path]
        module = peft_format.module_name(name)
        torch_leaf = NORM_LEAVES[path.rpartition(tree.SEP)[2]]
        tensors[f"{peft_format.KEY_PREFIX}{module}.{COPY}.{torch_leaf}"] = layout.to_hf(
            np.asarray(flat[path], np.float32))
        targets.add(module)
    others = [rule for rule in method.trainable_for(params) if rule not in method.rules]
    saved, saved_tensors = peft_format.modules_to_save(
        others, flat, names, targets, what="export_ln_tuning_peft", carries="a tuned norm")
    tensors.update(saved_tensors)
    candidates = {peft_format.module_name(names[p][0]) for p in flat
                  if re.fullmatch(r".*norm/scale", p)}
    config = {
        "peft_type": PEFT_TYPE, "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": peft_format.target_modules(targets, candidates),
        "modules_to_save": saved or None, "exclude_modules": None,
        "inference_mode": True, "revision": None,
    }
    peft_format.write_adapter(directory, config, tensors)
    return config


def import_ln_tuning_peft(directory: str, model, params) -> tuple[selection.Selection, dict]:
    """``(ln_tuning method, params)`` from a PEFT LN-tuning adapter for ``model``: each tuned
    norm's weight and bias replace the norm's own, ``modules_to_save`` replace theirs; the
    method trains the norms and those modules (``also_train``)."""
    adapter = peft_format.read_adapter(directory, (PEFT_TYPE,))
    flat = dict(tree.flatten(params))
    tree.check_same_structure(model.param_shapes(), params)
    parts = [f"{COPY}.{leaf}" for leaf in NORM_LEAVES.values()]
    found = peft_format.sort_tensors(adapter, model, flat, parts, holding="tuned norms",
                                     leaves=("scale",))
    loaded = {}
    for scale_path, (module, tensors) in found.adapted.items():
        norm = scale_path.rpartition(tree.SEP)[0]
        for ours, torch_leaf in NORM_LEAVES.items():
            path, value = f"{norm}/{ours}", tensors.get(f"{COPY}.{torch_leaf}")
            if value is None:
                continue
            if path not in flat:
                raise ValueError(f"{adapter.weights_path}: {module}.{COPY}.{torch_leaf} has no "
                                 f"counterpart: this {model.family} model's norm {norm} holds "
                                 f"no {ours}")
            loaded[path] = (f"{peft_format.KEY_PREFIX}{module}.{COPY}.{torch_leaf}", value)
    flat.update(peft_format.load_saved(loaded, found.names, flat, adapter.weights_path))
    flat.update(peft_format.load_saved(found.saved, found.names, flat, adapter.weights_path))
    method = selection.ln_tuning(also_train=peft_format.exact_rules(found.saved))
    return method, jax.tree.map(jnp.asarray, tree.unflatten(flat))
