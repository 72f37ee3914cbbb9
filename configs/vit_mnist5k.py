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
    common.train_from_scratch(config, args.steps, args.lr)
    if args.quick:
        common.make_quick(config)
    return config
