"""LoRA extraction: the best rank-r factors of ``finetuned - base`` for chosen kernels.

Any fine-tuned model becomes an adapter by a truncated SVD of each targeted weight delta (the
Eckart–Young optimum in Frobenius norm, as in LoRA-extraction tools such as mergekit's
``extract_lora`` and PEFT's delta-to-LoRA conversion): ``ΔW = U S Vᵀ`` gives
``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_rᵀ`` at scale 1, the square root split evenly so neither
factor dominates. The factors sit beside each kernel exactly where :mod:`research.lowrank.lora`
expects them (``.../query/kernel`` -> ``.../query/lora_a``, ``.../query/lora_b``; an embedding
``.../word/embedding`` -> ``.../word/lora_a`` ``[vocab, r]`` and ``.../word/lora_b``), so
``merge(base + factors, 1.0)`` rebuilds the fine-tuned model up to the reported error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from research import tree
from research.lowrank.init import matmul, as_matrix, split_shape, to_factors
from research.lowrank.lora import A, B, DEFAULT_INPUT_AXES, TARGET_LEAVES


def default_input_axes(path: str, shape) -> int:
    """Leading input axes of a kernel, by the same rules LoRA uses (the attention output
    ``[heads, head_dim, embed]`` has two; Dense, query/key/value and embeddings one)."""
    del shape
    return tree.resolve_rules(DEFAULT_INPUT_AXES, [path], default=1, require_match=False)[path]


def _factor_paths(path: str) -> tuple[str, str]:
    parent = path.rpartition(tree.SEP)[0]
    join = (lambda name: f"{parent}{tree.SEP}{name}") if parent else (lambda name: name)
    return join(A), join(B)


def extract_matrix(delta, r: int, n_in: int = 1):
    """``(A, B, info)`` for one delta: the rank-``r`` truncated SVD in the uniform layout, and
    ``info = {rank, error, energy}`` (relative Frobenius error ``||Δ - AB|| / ||Δ||`` and the
    fraction ``Σ_{i<r} σ_i² / Σ σ_i²`` of the delta's energy kept; 0 and 1 for a zero delta)."""
    d2 = as_matrix(delta, n_in)
    u, s, vh = jnp.linalg.svd(d2, full_matrices=False)
    root = jnp.sqrt(s[:r])
    a2, b2 = u[:, :r] * root, root[:, None] * vh[:r]
    total = float(jnp.sum(s ** 2))
    kept = float(jnp.sum(s[:r] ** 2))
    norm = float(jnp.linalg.norm(d2))
    error = float(jnp.linalg.norm(d2 - matmul(a2, b2))) / norm if norm > 0 else 0.0
    a, b = to_factors(a2, b2, delta.shape, n_in)
    return a, b, {"rank": r, "error": error, "energy": kept / total if total > 0 else 1.0}


def extract(base_params, tuned_params, targets,
            input_axes: Callable[[str, tuple], int] = default_input_axes):
    """LoRA factors (scale 1) approximating ``tuned - base`` at the targeted kernels.

    targets: ordered ``(regex, rank)`` rules over kernel and embedding paths (first match wins;
        rank 0 or None leaves a matched path alone). A rule that matches no such path, or a rank
        above ``min(fan_in, fan_out)``, is a one-line ValueError.
    input_axes: ``(path, shape) -> n_in``; embeddings always have one input axis.

    Returns ``(factors, report)``: the tree holding only the ``lora_a``/``lora_b`` leaves, and
    ``{kernel path: {rank, error, energy}}``.
    """
    flat_base, flat_tuned = tree.flatten(base_params), tree.flatten(tuned_params)
    candidates = [p for p in flat_base if p.rpartition(tree.SEP)[2] in TARGET_LEAVES]
    ranks = tree.resolve_rules(list(targets), candidates, what="LoRA extraction rule")
    factors, report = {}, {}
    for path in candidates:
        r = ranks[path]
        if not r:
            continue
        base = flat_base[path]
        if path not in flat_tuned:
            near = ", ".join(tree.closest_paths(path, flat_tuned))
            raise ValueError(f"LoRA extraction: {path!r} is not in the tuned model; "
                             f"closest: {near}")
        tuned = flat_tuned[path]
        shape = tuple(base.shape)
        if tuple(tuned.shape) != shape:
            raise ValueError(f"LoRA extraction: {path} is {shape} in the base model and "
                             f"{tuple(tuned.shape)} in the tuned one")
        n_in = 1 if path.endswith("embedding") else int(input_axes(path, shape))
        ins, outs = split_shape(shape, n_in)
        fan_in, fan_out = math.prod(ins), math.prod(outs)
        if not isinstance(r, (int, np.integer)) or not 0 < r <= min(fan_in, fan_out):
            raise ValueError(f"LoRA extraction rank {r!r} for {path} must be in [1, "
                             f"{min(fan_in, fan_out)}]: {shape} is {fan_in} (inputs {ins}) x "
                             f"{fan_out} (outputs {outs})")
        delta = jnp.asarray(tuned, jnp.float32) - jnp.asarray(base, jnp.float32)
        a, b, info = extract_matrix(delta, int(r), n_in)
        a_path, b_path = _factor_paths(path)
        factors[a_path], factors[b_path] = a, b
        report[path] = info
    return tree.unflatten(factors), report
