"""IAPT (Zhu et al., 2024) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: at every
layer a small generator (attention pooling, bottleneck, learned rational activation) makes four
prompt tokens from that layer's input, the classifier trained beside them, the rest frozen.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_iapt.py --workdir runs/iapt
    python -m launch.main --config configs/minilm_iapt.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_iapt.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    config.method = dict(name="iapt", num_virtual_tokens=4, bottleneck=32,
                         also_train=(r"classifier/.*",))
    # PEFT has no IAPT; the generators start with a zero up-projection, and prompt learning on
    # this model (minilm_prompt_tuning.py) trains at 1e-3 (AdamW), as here.
    config.optim.learning_rate = 1e-3
    # No decay on the rational coefficients (a shape, not a weight) or the queries.
    config.optim.weight_decay = ((r"(classifier|iapt/layer_\d+/(down|up))/kernel", 0.01),)
    return config
