"""Sparse then Prune (Prasetyo et al., 2023): the ViT of ``vit_mnist5k.py`` trained with an L1
penalty ``strength·Σ|θ|`` on its block kernels (method ``sparse_reg``), so that magnitude
pruning afterwards (``python -m launch.prune vit``) removes weights the model no longer uses.
``group`` swaps L1 for group-L1 over attention heads and MLP channels.

    python -m launch.main --config configs/vit_sparse_reg.py --workdir runs/prune/vit_sparse_reg
    python -m launch.main --config configs/vit_sparse_reg.py:strength=1e-3,group ...
    python -m launch.main --config configs/vit_sparse_reg.py:quick --workdir /tmp/vit_sr_quick
"""

from configs import common, vit_mnist5k
from research.sparse import prune


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, steps=600, lr=1e-3, seed=0, strength=1e-4,
                            group=False)
    config = vit_mnist5k.get_config(f"steps={args.steps},lr={args.lr},seed={args.seed}"
                                    + (",quick" if args.quick else ""))
    config.method = dict(name="sparse_reg", strength=args.strength, targets=prune.DEFAULT_TARGETS,
                         group_axes=prune.HEADS_AND_CHANNELS if args.group else ())
    return config
