"""Prefix tuning (Li & Liang, 2021) on real pretrained MiniLM-L6 for rotten_tomatoes
sentiment: 20 trained key and value rows in front of every layer's attention, the classifier
trained beside them, the rest frozen.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_prefix_tuning.py --workdir runs/prefix_tuning
    python -m launch.main --config configs/minilm_prefix_tuning.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_prefix_tuning.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    config.method = dict(name="prefix_tuning", num_virtual_tokens=20,
                         also_train=(r"classifier/.*",))
    # PEFT's prefix-tuning sequence-classification example: 1e-2 (AdamW), without the
    # paper's MLP reparameterisation (prefix_projection=False).
    config.optim.learning_rate = 1e-2
    # No decay on the prefixes: pulling keys and values towards zero is no neutral prior.
    config.optim.weight_decay = ((r"classifier/kernel", 0.01),)
    return config
