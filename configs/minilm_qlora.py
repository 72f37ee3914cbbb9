"""QLoRA (Dettmers et al., 2023) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment:
every encoder kernel stored in 4-bit NormalFloat (blocks of 64) and dequantised in its matmul,
rank-8 LoRA factors beside them and the pooler, the classifier trained whole.
Everything else is LoRA's experiment (``minilm_lora.py``), so the two compare directly.

    python -m launch.main --config configs/minilm_qlora.py --workdir runs/qlora_r8
    python -m launch.main --config configs/minilm_qlora.py:quick ...   (smoke test)
"""

from configs import minilm_lora


def get_config(arg: str | None = None):
    config = minilm_lora.get_config(arg)
    config.method = dict(config.method, name="qlora", quant="nf4", block_size=64)
    return config
