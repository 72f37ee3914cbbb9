"""Regularized mask tuning (Zheng et al., 2023) on pretrained MiniLM-L6 for rotten_tomatoes
sentiment: a binary mask over every encoder attention kernel (as the paper's R-AMT), learned
with a straight-through estimator, the norm penalty 1e-4·Σ‖S‖₂ and gradient dropout (λ = 1)
against the distillation loss towards the unmasked model; the classifier trains normally, all
weights stay frozen. Adam as the paper: scores at 8e-5 (1e-3 × 0.08, the classifier's rate),
cosine decay. ``train/mask_sparsity`` in metrics.jsonl is the share of masked-off entries.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_mask_tuning.py --workdir runs/mask_tuning
    python -m launch.main --config configs/minilm_mask_tuning.py:gdr=0 ...   (no gradient dropout)
    python -m launch.main --config configs/minilm_mask_tuning.py:quick ...   (smoke test)
"""

from configs import common, minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, task="sentiment", gdr=1.0)
    config = minilm_rotten_tomatoes.get_config(
        f"task={args.task}" + (",quick" if args.quick else ""))
    config.method = dict(name="mask_tuning", gdr_lambda=args.gdr)
    config.optim.learning_rate = 1e-3
    config.optim.lr_multipliers = ((r"mask_score/.*", 0.08),)
    config.optim.schedule = "cosine"
    config.optim.weight_decay = ((r"classifier/kernel", 0.01),)  # none on the scores
    return config
