"""IA³ (Liu et al., 2022) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: learned
vectors rescale every encoder layer's keys, values and MLP-output inputs, the classifier
trained whole, the rest frozen.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_ia3.py --workdir runs/ia3
    python -m launch.main --config configs/minilm_ia3.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_ia3.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    config.method = dict(name="ia3", targets=(r"encoder/.*/attn/(key|value)/kernel",
                                              r"encoder/.*/mlp/wo/kernel"),
                         feedforward=(r"encoder/.*/mlp/wo/kernel",),
                         also_train=(r"classifier/.*",))
    # The paper trains its vectors at 3e-3 (Adafactor); vectors at 1 need a large rate to move.
    config.optim.learning_rate = 3e-3
    # Decay would pull the scales towards 0 rather than towards the identity (1).
    config.optim.weight_decay = ((r".*/kernel", 0.01),)
    return config
