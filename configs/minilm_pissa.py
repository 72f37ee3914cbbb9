"""PiSSA (Meng, Wang & Zhang, 2024) on pretrained MiniLM-L6 for rotten_tomatoes sentiment: the
LoRA run of ``minilm_lora.py`` (rank 8 on every encoder kernel), with the factors starting as
each kernel's top-8 singular components and the frozen kernels keeping the residual.

    python -m launch.main --config configs/minilm_pissa.py --workdir runs/pissa_r8
    python -m launch.main --config configs/minilm_pissa.py:quick ...   (smoke test)
"""

from configs import minilm_lora


def get_config(arg: str | None = None):
    config = minilm_lora.get_config(arg)
    config.method.init_weights = "pissa"
    return config
