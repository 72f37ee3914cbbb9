"""Personalised models (Zlotchevski et al., 2022): lightweight fine-tuning of the last layer
alone (the last decoder block, the final norm after it and the output layer) on one slice of
Shakespeare, from a base run. The shared recipe is in ``llama_shakespeare_lightweight.py``.

    python -m launch.main --config configs/llama_shakespeare_last_layer.py:init_from=runs/base \
        --workdir runs/last_layer
"""

from configs import llama_shakespeare_lightweight


def get_config(arg: str | None = None):
    return llama_shakespeare_lightweight.personalise(arg, dict(name="last_layer"), 1e-3)
