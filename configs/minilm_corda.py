"""CorDA (Yang et al., 2024), instruction-previewed mode, on pretrained MiniLM-L6 for
rotten_tomatoes sentiment: the LoRA run of ``minilm_lora.py`` (rank 8 on every encoder kernel),
with the factors starting as the 8 largest components of ``C·W``, ``C`` each kernel's input
covariance over 4 training batches.

    python -m launch.main --config configs/minilm_corda.py --workdir runs/corda_ipm_r8
    python -m launch.main --config configs/minilm_corda.py:quick ...   (smoke test)
"""

from configs import minilm_lora


def get_config(arg: str | None = None):
    config = minilm_lora.get_config(arg)
    config.method.init_weights = "corda_ipm"
    config.method.calibration_batches = 4
    return config
