"""Visual query tuning (Tu et al., 2023) on the ViT of ``vit_mnist5k.py``: the trained ViT stays
frozen; ``queries`` learned tokens per block summarise that block's input with the block's own
weights, and a linear head on the summaries (starting at zero) joins the classifier, which
trains too. No gradient enters the ViT, so training holds none of its activations.

The base is a finished ``vit_mnist5k.py`` run (``base``, default ``runs/vit_mnist5k``, what that
config's docstring writes); ``quick`` starts from fresh weights, so the smoke test runs alone.

    python -m launch.main --config configs/vit_mnist5k.py --workdir runs/vit_mnist5k
    python -m launch.main --config configs/vit_mnist5k_vqt.py --workdir runs/vit_vqt
    python -m launch.main --config configs/vit_mnist5k_vqt.py:queries=4,base=runs/vit_s1 ...
    python -m launch.main --config configs/vit_mnist5k_vqt.py:quick ...   (smoke test)
"""

from configs import common, vit_mnist5k


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, steps=300, lr=1e-3, seed=0, queries=1,
                            base="runs/vit_mnist5k")
    config = vit_mnist5k.get_config(f"steps={args.steps},lr={args.lr},seed={args.seed}"
                                    + (",quick" if args.quick else ""))
    config.model.init_from = "" if args.quick else args.base
    config.method = dict(name="vqt", num_queries=args.queries, also_train=(r"classifier/.*",))
    # Decay on the two linear heads; none on the queries, which the frozen blocks normalise.
    config.optim.weight_decay = ((r"(classifier|vqt/head)/kernel", 0.01),)
    return config
