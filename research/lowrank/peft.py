"""LoRA adapters in Hugging Face PEFT's on-disk format (``adapter_config.json`` +
``adapter_model.safetensors``), both ways.

PEFT stores, per adapted torch module ``M`` (names as ``transformers`` gives them),
``base_model.model.M.lora_A.weight [r, in]`` and ``lora_B.weight [out, r]``, or for an
embedding ``M.lora_embedding_A [r, vocab]`` and ``M.lora_embedding_B [embed, r]``; a DoRA
adapter (``use_dora``) adds ``M.lora_magnitude_vector [out]`` (our ``dora_m``, flattened); whole
modules that train beside the adapter (``modules_to_save``) are stored under their plain names.
Names, layouts and the folder's reading and writing come from :mod:`research.peft_format`:
``A`` (the kernel's input axes plus the rank) converts with the kernel's own layout and ``B``
(rank plus output axes) with ``linear(1)``.
"""

from __future__ import annotations

import jax
import numpy as np

from research import peft_format, tree
from research.lowrank import dora
from research.lowrank.lora import LoRA, TARGET_LEAVES, WEIGHT_INITS, factor_pairs, strip_factors
from research.models import hf
from research.peft_format import KEY_PREFIX

MAGNITUDE = "lora_magnitude_vector"
LINEAR_PARTS = ("lora_A.weight", "lora_B.weight")
EMBEDDING_PARTS = ("lora_embedding_A", "lora_embedding_B")
# Options of PEFT's LoraConfig Scion does not support, at the values it does.
PLAIN = {"fan_in_fan_out": False, "bias": "none", "lora_bias": False}


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_peft(method: LoRA, params, model, directory: str, *,
                base_model_name_or_path: str | None = None) -> dict:
    """Write ``params``' LoRA factors (with DoRA's magnitudes, if any, and the ``also_train``
    modules, as PEFT's ``modules_to_save``) as a PEFT adapter for ``model``'s ``transformers``
    class. Returns the adapter config written."""
    if method.init_weights in WEIGHT_INITS:
        raise ValueError(f"export_peft: a LoRA with init_weights={method.init_weights!r} lives "
                         f"on residual base kernels; convert it first with "
                         f"lora.to_plain_lora(method, params, initial_factors)")
    flat = tree.flatten(params)
    pairs = factor_pairs(flat)
    if not pairs:
        raise ValueError("export_peft: params hold no LoRA factors")
    use_dora = {dora.magnitude_path(path) in flat for path in pairs}
    if len(use_dora) > 1:
        raise ValueError("export_peft: some adapted leaves have DoRA magnitudes and some do "
                         "not; PEFT's use_dora covers every module")
    use_dora = use_dora.pop()
    base = dora.strip_magnitudes(strip_factors(flat))
    tree.check_same_structure(model.param_shapes(), tree.unflatten(base))
    names = peft_format.hf_names(model, base)
    alphas = tree.resolve_rules(method.alpha_rules, list(pairs), default=method.alpha,
                                what="LoRA alpha rule")

    tensors, ranks, module_alphas = {}, {}, {}
    for path, pair in pairs.items():
        name, layout = names[path]
        module = peft_format.weight_module(name, path)
        a, b = np.asarray(flat[pair.a], np.float32), np.asarray(flat[pair.b], np.float32)
        rank = a.shape[-1]
        if pair.embedding:
            tensors[f"{KEY_PREFIX}{module}.lora_embedding_A"] = a.T
            tensors[f"{KEY_PREFIX}{module}.lora_embedding_B"] = b.T
        else:
            out_size, in_size = peft_format.hf_shape(layout, tuple(flat[path].shape))
            a_hf, b_hf = layout.to_hf(a), hf.linear(1).to_hf(b)
            if a_hf.shape != (rank, in_size) or b_hf.shape != (out_size, rank):
                raise ValueError(f"export_peft: {path} {tuple(flat[path].shape)} is not a "
                                 f"torch Linear [{out_size}, {in_size}] PEFT can adapt")
            tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a_hf
            tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b_hf
            if use_dora:
                magnitude = flat[dora.magnitude_path(path)]
                tensors[f"{KEY_PREFIX}{module}.{MAGNITUDE}"] = np.asarray(
                    magnitude, np.float32).reshape(-1)
        ranks[module], module_alphas[module] = int(rank), float(alphas[path])

    saved, saved_tensors = peft_format.modules_to_save(
        method.also_train, base, names, ranks, what="export_peft", carries="LoRA factors")
    tensors.update(saved_tensors)
    candidates = set(peft_format.adaptable_modules(names, TARGET_LEAVES)) - set(saved)
    rank, alpha = peft_format.most_common(ranks), peft_format.most_common(module_alphas)
    config = {
        "peft_type": "LORA", "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": float(method.dropout),
        "target_modules": peft_format.target_modules(set(ranks), candidates),
        "rank_pattern": {peft_format.pattern_key(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {peft_format.pattern_key(m): a for m, a in module_alphas.items()
                          if a != alpha},
        "use_rslora": bool(method.rslora), "modules_to_save": saved or None,
        "bias": "none", "fan_in_fan_out": False, "use_dora": use_dora, "init_lora_weights": True,
        "inference_mode": True, "revision": None,
    }
    peft_format.write_adapter(directory, config, tensors)
    return config


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def import_peft(directory: str, model, params, **options) -> tuple[LoRA, dict]:
    """``(LoRA method, params with factors)`` from a PEFT LoRA adapter for ``model`` (a
    :class:`~research.lowrank.dora.DoRA` method, with magnitudes, for ``use_dora``).
    ``params`` are the base weights (factors already in them are replaced); ``modules_to_save``
    weights replace theirs and train (``also_train``). ``options`` go to :class:`LoRA`
    (``dropout``, ``init_weights``...). An adapter that does not fit the model is a one-line error
    naming the module and both shapes."""
    adapter = peft_format.read_adapter(directory, ("LORA",), PLAIN)
    config, weights_path = adapter.config, adapter.weights_path
    if config.get("target_parameters") or config.get("trainable_token_indices"):
        raise ValueError(f"{adapter.config_path}: target_parameters / trainable_token_indices "
                         f"are not supported")
    use_dora = bool(config.get("use_dora", False))
    flat = dora.strip_magnitudes(strip_factors(tree.flatten(params)))
    tree.check_same_structure(model.param_shapes(), tree.unflatten(flat))
    found = peft_format.sort_tensors(adapter, model, flat,
                                     (*LINEAR_PARTS, *EMBEDDING_PARTS, MAGNITUDE),
                                     holding="LoRA factors", leaves=TARGET_LEAVES)

    ranks, alphas, factors_hf = {}, {}, {}
    for path, (module, parts) in found.adapted.items():
        layout = found.names[path][1]
        shape = tuple(flat[path].shape)
        embedding = path.endswith("embedding")
        kinds = EMBEDDING_PARTS if embedding else LINEAR_PARTS
        if use_dora:
            if embedding:
                raise ValueError(f"{weights_path}: DoRA on embedding {module!r} is not "
                                 f"supported")
            kinds += (MAGNITUDE,)
        if set(parts) != set(kinds):
            raise ValueError(f"{weights_path}: adapter module {module!r} has {sorted(parts)}; "
                             f"{path} {shape} needs {list(kinds)}")
        a, b = parts[kinds[0]], parts[kinds[1]]
        rank = a.shape[0]
        out_size, in_size = ((shape[1], shape[0]) if embedding
                             else peft_format.hf_shape(layout, shape))
        want_a, want_b = (rank, in_size), (out_size, rank)
        if a.ndim != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"{weights_path}: adapter module {module!r}: {kinds[0]} {tuple(a.shape)} and "
                f"{kinds[1]} {tuple(b.shape)} do not fit this model's {path} {shape}, which "
                f"needs {want_a} and {want_b}")
        if use_dora and tuple(parts[MAGNITUDE].shape) != (out_size,):
            raise ValueError(f"{weights_path}: adapter module {module!r}: {MAGNITUDE} "
                             f"{tuple(parts[MAGNITUDE].shape)} does not fit this model's "
                             f"{path} {shape}, which needs ({out_size},)")
        ranks[path] = int(rank)
        alphas[path] = float(peft_format.pattern_value(config.get("alpha_pattern"), module,
                                                       config.get("lora_alpha", 8)))
        factors_hf[path] = (a, b, layout, embedding, parts.get(MAGNITUDE))

    alpha = peft_format.most_common(alphas)
    method = (dora.DoRA if use_dora else LoRA)(
        targets=peft_format.value_rules(ranks), alpha=alpha,
        alpha_rules=peft_format.value_rules({p: a for p, a in alphas.items() if a != alpha}),
        rslora=bool(config.get("use_rslora", False)),
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        also_train=peft_format.exact_rules(found.saved), **options)

    plan = method.plan(tree.unflatten(flat))
    for path, target in plan.items():
        a, b, layout, embedding, magnitude = factors_hf[path]
        n_in, rank = target.input_axes, target.rank
        a_shape, b_shape = (*target.shape[:n_in], rank), (rank, *target.shape[n_in:])
        module = path.rpartition(tree.SEP)[0]
        if embedding:
            a_ours, b_ours = a.T, b.T
        else:
            a_ours, b_ours = layout.to_ours(a, a_shape), hf.linear(1).to_ours(b, b_shape)
        flat[f"{module}/lora_a"] = np.asarray(a_ours, np.float32)
        flat[f"{module}/lora_b"] = np.asarray(b_ours, np.float32)
        if magnitude is not None:
            flat[dora.magnitude_path(path)] = np.asarray(
                magnitude.reshape(target.shape[n_in:]), np.float32)
    flat.update(peft_format.load_saved(found.saved, found.names, flat, weights_path))
    return method, jax.tree.map(jax.numpy.asarray, tree.unflatten(flat))
