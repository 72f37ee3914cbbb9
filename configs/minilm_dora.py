"""DoRA (Liu et al., 2024) on pretrained MiniLM-L6 for rotten_tomatoes sentiment: the LoRA run
of ``minilm_lora.py`` (rank 8 on every encoder kernel) with a trainable magnitude per output
feature of each adapted kernel.

    python -m launch.main --config configs/minilm_dora.py --workdir runs/dora_r8
    python -m launch.main --config configs/minilm_dora.py:quick ...   (smoke test)
"""

from configs import minilm_lora


def get_config(arg: str | None = None):
    config = minilm_lora.get_config(arg)
    config.method.name = "dora"
    # The magnitudes (dora_m) match none of minilm_lora's weight-decay rules, on purpose:
    # decay would pull each column's norm towards 0, not the update towards no change.
    return config
