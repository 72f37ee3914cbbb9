"""Pfeiffer adapters (Pfeiffer et al., 2021, AdapterFusion; AdapterHub's default) on real
pretrained MiniLM-L6 for rotten_tomatoes sentiment: one bottleneck adapter (384 -> 24 -> 384,
ReLU) after the MLP of every encoder layer, inside the residual before the post-LN; the
classifier trains whole, the rest is frozen.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_pfeiffer.py --workdir runs/pfeiffer
    python -m launch.main --config configs/minilm_pfeiffer.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_pfeiffer.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    config.method = dict(name="pfeiffer", reduction_factor=16, nonlinearity="relu",
                         also_train=(r"classifier/.*",))
    # AdapterFusion trains its adapters at 1e-4 for tens of epochs; this run is under one, so
    # it takes the next rate of Houlsby et al.'s grid.
    config.optim.learning_rate = 3e-4
    config.optim.weight_decay = ((r".*/kernel", 0.01),)
    return config
