"""OT fusion of two ViTs trained from scratch on mnist5k with different seeds (Imfeld et al.,
2024, "Transformer Fusion with Optimal Transport"): one-shot fusion against vanilla averaging
and permutation matching, interpolation curves, and a fine-tune of 10% of a parent's steps.

    python -m launch.fusion_experiments --config configs/fusion_vit_mnist5k.py [--quick]
"""

from configs import common, vit_mnist5k


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False)
    return common.fusion_experiment(
        "configs/vit_mnist5k.py", "vit", "vit", args.quick, metrics=("accuracy", "loss"),
        select="accuracy",
        activations=dict(examples=32, batch_size=16) if args.quick else dict(examples=256,
                                                                            batch_size=64),
        finetune_steps=vit_mnist5k.get_config().train.steps // 10)
