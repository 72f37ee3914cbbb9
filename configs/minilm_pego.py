"""PEGO (Hu et al., 2024) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: K=4 LoRA
modules of rank 2 beside every encoder kernel (the same targets and total rank 8 as
``minilm_lora.py``, and the same scale: alpha 4 / r 2 = 16 / 8), trained with the paper's
orthogonality regulariser. Its weight is 1e-4, a tenth of the paper's: the paper regularises the
query and value kernels only, and over all 36 kernels (1536-wide MLP outputs included) the term
at 1e-3 outweighs the task loss from the first steps. Everything else is the LoRA experiment.

    python -m launch.main --config configs/minilm_pego.py --workdir runs/pego_k4r2
    python -m launch.main --config configs/minilm_pego.py:quick ...   (smoke test)
"""

from configs import minilm_lora


def get_config(arg: str | None = None):
    config = minilm_lora.get_config(arg)
    config.method = dict(name="pego", targets=((r"(encoder/.*|pooler)/kernel", 2),), modules=4,
                         alpha=4.0, orthogonality_weight=1e-4, regulariser="paper",
                         also_train=(r"classifier/.*",))
    return config
