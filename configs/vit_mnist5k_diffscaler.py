"""Diffscaler (Nair et al., 2024) on the ViT of ``vit_mnist5k.py``: the trained ViT stays
frozen and every linear layer of its blocks gets an Affiner (a per-channel rescaling of its
weight, a new bias, and a rank-8 ReLU branch); the classifier trains whole. ``export`` folds the
rescaling and the bias into the weights and keeps the branches beside them.

The base is a finished ``vit_mnist5k.py`` run (``base``, default ``runs/vit_mnist5k``, what that
config's docstring writes); ``quick`` starts from fresh weights, so the smoke test runs alone.

    python -m launch.main --config configs/vit_mnist5k.py --workdir runs/vit_mnist5k
    python -m launch.main --config configs/vit_mnist5k_diffscaler.py --workdir runs/vit_diffscaler
    python -m launch.main --config configs/vit_mnist5k_diffscaler.py:base=runs/vit_s1 ...
    python -m launch.main --config configs/vit_mnist5k_diffscaler.py:quick ...   (smoke test)
"""

from configs import common, vit_mnist5k


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, steps=300, lr=1e-3, seed=0, rank=8,
                            base="runs/vit_mnist5k")
    config = vit_mnist5k.get_config(f"steps={args.steps},lr={args.lr},seed={args.seed}"
                                    + (",quick" if args.quick else ""))
    config.model.init_from = "" if args.quick else args.base
    config.method = dict(name="diffscaler", rank=args.rank, also_train=(r"classifier/.*",))
    # Decay on the classifier and the branch (keeping the new subspace small); none on the
    # scales, which it would pull towards 0 rather than the identity (1), or the shifts.
    config.optim.weight_decay = ((r".*/(kernel|diffscaler/(down|up))", 0.01),)
    return config
