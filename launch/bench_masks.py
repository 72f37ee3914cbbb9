"""Masking and sparse-update benchmark: ``python -m launch.bench masks``.

MiniLM shapes (batch 32 x 64 tokens, random weights: same shapes and FLOPs), AdamW. For each
method, XLA's deterministic step FLOPs (``cost_analysis``) and argument + temporary bytes
(``memory_analysis``) of the compiled training step, divided by full fine-tuning's: BitFit
(biases and the classifier), S²FT with 5% of the heads and FFN channels of every block (a
frozen kernel needs no weight gradient, so its step does the forward and the input gradients,
not the weight gradients) and LT-SFT's retraining at 5% density (the ``sparse`` method: the
dense weight gradients are still computed, then gathered at the K entries, but the optimizer
keeps state for those only). Then a 5%-density sparse delta's bytes on disk divided by the
dense delta's. Prints ``key=value`` lines; the last is ``s2ft_flops_ratio``.
"""

from __future__ import annotations

import os

S2FT_METHOD = dict(name="s2ft", heads=0.05, channels=0.05)
METHODS = {"full": dict(name="full"), "bitfit": dict(name="bitfit"), "s2ft": S2FT_METHOD}
DENSITY = 0.05


def step_figures(method: dict) -> tuple[float, int, int]:
    """``(FLOPs, argument + temporary bytes, trainable parameters)`` of one compiled step."""
    import jax

    from launch.bench import minilm_batch, minilm_setup
    from launch.bench_lora import _figures
    from research import tree
    from research.train import loop

    _, setup = minilm_setup({"data": 1}, 100, method, jax.devices()[:1])
    compiled = loop.make_train_step(setup).lower(setup.abstract_state,
                                                 minilm_batch(setup)).compile()
    return (*_figures(compiled), tree.count(setup.abstract_state["trainable"]))


def sparse_files(folder: str) -> tuple[str, int, int]:
    """``(mask file, sparse delta bytes, dense delta bytes)``: a random 5%-density delta over
    MiniLM's encoder, saved as a sparse delta and as a dense safetensors file."""
    import jax
    import numpy as np
    import safetensors.numpy

    from launch.bench import minilm_setup
    from research import tree
    from research.sparse import delta as delta_lib
    from research.sparse import masks

    _, setup = minilm_setup({"data": 1}, 100, None, jax.devices()[:1])
    rng = np.random.default_rng(0)
    update = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                          setup.model.param_shapes())
    mask = masks.top_k(update, density=DENSITY, rules=[(r"classifier/.*", False), (".*", True)])
    sparse = delta_lib.difference(update, jax.tree.map(np.zeros_like, update), mask)
    sparse_path, dense_path = f"{folder}/sparse.safetensors", f"{folder}/dense.safetensors"
    delta_lib.save(sparse, sparse_path)
    safetensors.numpy.save_file(tree.flatten(update), dense_path)
    delta_lib.save(delta_lib.from_mask(mask, update), f"{folder}/mask.safetensors")
    return f"{folder}/mask.safetensors", os.path.getsize(sparse_path), os.path.getsize(dense_path)


def main() -> None:
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as folder:
        mask_path, sparse_bytes, dense_bytes = sparse_files(folder)
        methods = {**METHODS, "lt_sft": dict(name="sparse", mask=mask_path,
                                             dense=(r"classifier/.*",))}
        figures = {name: step_figures(method) for name, method in methods.items()}
    full_flops, full_bytes, _ = figures["full"]
    print(f"backend={jax.default_backend()}")
    for name, (flops, size, trainable) in figures.items():
        print(f"{name}_trainable_params={trainable}")
        print(f"{name}_step_gflop={flops / 1e9:.3f}")
        print(f"{name}_arg_plus_temp_bytes={size}")
    for name in ("bitfit", "lt_sft", "s2ft"):
        flops, size, _ = figures[name]
        print(f"{name}_bytes_ratio={size / full_bytes:.4f}")
        if name != "s2ft":
            print(f"{name}_flops_ratio={flops / full_flops:.4f}")
    print(f"sparse_delta_disk_bytes={sparse_bytes}")
    print(f"dense_delta_disk_bytes={dense_bytes}")
    print(f"sparse_delta_disk_ratio={sparse_bytes / dense_bytes:.4f}")

    print(f"s2ft_flops_ratio={figures['s2ft'][0] / full_flops:.4f}")
