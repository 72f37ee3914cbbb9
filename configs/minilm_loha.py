"""LoHa (Hyeon-Woo et al., 2022, FedPara) on real pretrained MiniLM-L6 for rotten_tomatoes
sentiment: rank-8 Hadamard-product updates beside every encoder kernel and the pooler's, the
classifier trained whole, the rest frozen.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_loha.py --workdir runs/loha_r8
    python -m launch.main --config configs/minilm_loha.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_loha.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    # alpha = 2r as in PEFT's LoHa benchmark runs (r=32, alpha=64).
    config.method = dict(name="loha", targets=((r"(encoder/.*|pooler)/kernel", 8),), alpha=16.0,
                         also_train=(r"classifier/.*",))
    # PEFT's benchmark trains LoHa at 1e-4 for 5000 steps; with hada_w2_b starting at zero and
    # the update a product of small factors, 250 steps need LoRA's higher rate.
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = ((r".*/(kernel|hada_w[12]_[ab])", 0.01),)
    return config
