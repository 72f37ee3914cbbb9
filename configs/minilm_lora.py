"""LoRA (Hu et al., 2021) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: rank-8
factors beside every encoder kernel, the classifier and pooler trained whole, the rest frozen.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_lora.py --workdir runs/lora_r8
    python -m launch.main --config configs/minilm_lora.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_lora.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    config.method = dict(name="lora", targets=((r"encoder/.*/(kernel)", 8),), alpha=16.0,
                         also_train=(r"classifier/.*", r"pooler/.*"))
    config.optim.learning_rate = 5e-4  # LoRA factors take a higher rate than full fine-tuning
    config.optim.weight_decay = ((r".*/(kernel|lora_a|lora_b)", 0.01),)
    return config
