"""SSF (Lian et al., 2022) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: a
per-channel scale and shift after every operation of every encoder layer (query, key, value,
attention output, both MLP layers, both LayerNorms) and after the embeddings' LayerNorm, the
classifier trained whole, the rest frozen. ``export`` folds them into the weights, so the
exported model is plain MiniLM.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_ssf.py --workdir runs/ssf
    python -m launch.main --config configs/minilm_ssf.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_ssf.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes
from research.adapters import ssf


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    config.method = dict(name="ssf", targets=(*ssf.DEFAULT_TARGETS, r"embeddings/norm"),
                         init_std=0.02, also_train=(r"classifier/.*",))
    # The paper's released scripts train SSF at 5e-3 to 1e-2 (AdamW, VTAB-1k); scales near 1
    # need a large rate to move.
    config.optim.learning_rate = 5e-3
    # Decay would pull the scales towards 0 rather than towards the identity (1).
    config.optim.weight_decay = ((r".*/kernel", 0.01),)
    return config
