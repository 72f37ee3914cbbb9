"""OT fusion of two tiny BERT encoders pretrained with masked LM on Shakespeare from different
seeds (the BERT case of Imfeld et al., 2024): held-out masked-LM loss of the parents, vanilla
averaging, OT fusion and permutation matching, interpolation curves, and a fine-tune of 10% of
a parent's steps.

    python -m launch.fusion_experiments --config configs/fusion_bert_shakespeare.py [--quick]
"""

from configs import bert_shakespeare_mlm, common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False)
    return common.fusion_experiment(
        "configs/bert_shakespeare_mlm.py", "bert", "mlm", args.quick, metrics=("loss",),
        select="loss",
        activations=dict(examples=16, batch_size=8) if args.quick else dict(examples=256,
                                                                           batch_size=32),
        finetune_steps=bert_shakespeare_mlm.get_config().train.steps // 10)
