"""LEVI (Roh et al., 2024) on the ViT of ``vit_mnist5k.py``: the trained ViT stays frozen; a
small transformer of width ``width`` (one narrow block per ViT block), trained from scratch on
the embedded patches, joins the ViT's block outputs layer by layer, and learned layer weights
mix them into what the final norm and classifier read (the classifier trains too). It starts
as the ViT: the joins start at zero and the weights on the last layer.

The base is a finished ``vit_mnist5k.py`` run (``base``, default ``runs/vit_mnist5k``, what that
config's docstring writes); ``quick`` starts from fresh weights, so the smoke test runs alone.

    python -m launch.main --config configs/vit_mnist5k.py --workdir runs/vit_mnist5k
    python -m launch.main --config configs/vit_mnist5k_levi.py --workdir runs/vit_levi
    python -m launch.main --config configs/vit_mnist5k_levi.py:width=16,base=runs/vit_s1 ...
    python -m launch.main --config configs/vit_mnist5k_levi.py:quick ...   (smoke test)
"""

from configs import common, vit_mnist5k


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, steps=300, lr=1e-3, seed=0, width=32, heads=2,
                            base="runs/vit_mnist5k")
    config = vit_mnist5k.get_config(f"steps={args.steps},lr={args.lr},seed={args.seed}"
                                    + (",quick" if args.quick else ""))
    config.model.init_from = "" if args.quick else args.base
    config.method = dict(name="levi", width=args.width, heads=args.heads,
                         also_train=(r"classifier/.*",))
    # Decay on the matrices (the small model's from-scratch weights, the joins, the
    # classifier); none on the layer weights, which would pull the ensemble off the ViT.
    config.optim.weight_decay = ((r".*/kernel", 0.01),)
    return config
