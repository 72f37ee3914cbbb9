"""A small ViT trained from scratch on mnist5k (5000 real MNIST digits).

The model for the image experiments of the sparse family: intrinsic dimension (d90), magnitude
pruning and sparse-then-prune, FinerCut.

    python -m launch.main --config configs/vit_mnist5k.py --workdir runs/vit_mnist5k
    python -m launch.main --config configs/vit_mnist5k.py:quick --workdir /tmp/vit_quick
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, steps=600, lr=1e-3, seed=0)
    config = common.base_config()
    config.seed = args.seed
    config.data.name = "mnist5k"
    config.model.name = "vit_tiny_classifier"
    config.train.batch_size = 64
    config.train.eval_batch_size = 256
    config.train.steps = args.steps
    config.train.log_every = 50
    config.optim.learning_rate = args.lr
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = args.steps // 20
    config.optim.weight_decay = ((".*/(kernel|embedding)", 0.01),)
    config.checkpoint.every = args.steps
    config.checkpoint.keep = 1
    if args.quick:
        config.train.steps = 4
        config.train.log_every = 2
        config.train.final_eval_splits = ("validation",)
        config.optim.warmup_steps = 0
        config.checkpoint.every = 2
    return config
