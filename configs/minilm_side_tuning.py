"""Hierarchical side-tuning (Lin et al., 2023) on real pretrained MiniLM-L6 for rotten_tomatoes
sentiment: the model stays frozen, a side network of width 64 (one narrow block per encoder
layer) reads every block's output, and its output reaches the pooler and classifier, which
train with it. No gradient enters MiniLM.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_side_tuning.py --workdir runs/side_tuning
    python -m launch.main --config configs/minilm_side_tuning.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_side_tuning.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    # The pooler reads the side network's output, not MiniLM's: it trains with the classifier.
    config.method = dict(name="side_tuning", width=64, heads=4,
                         also_train=(r"(pooler|classifier)/.*",))
    # The side network starts from scratch: the from-scratch rate of the zoo's small models
    # (HST trains its side network with AdamW at 1e-3).
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = ((r".*/kernel", 0.01),)
    return config
