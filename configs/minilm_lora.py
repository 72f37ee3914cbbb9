"""LoRA (Hu et al., 2021) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: rank-8
factors beside every encoder kernel and the pooler's, the classifier trained whole, the rest
frozen: 1.5% of the parameters train.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_lora.py --workdir runs/lora_r8
    python -m launch.main --config configs/minilm_lora.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_lora.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    config.method = dict(name="lora", targets=((r"(encoder/.*|pooler)/kernel", 8),), alpha=16.0,
                         also_train=(r"classifier/.*",))
    # Factors starting from zero need a higher rate than full fine-tuning to move in 250 steps.
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = ((r".*/(kernel|lora_a|lora_b)", 0.01),)
    return config
