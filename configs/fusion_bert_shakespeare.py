"""OT fusion of two tiny BERT encoders pretrained with masked LM on Shakespeare from different
seeds (the BERT case of Imfeld et al., 2024): held-out masked-LM loss of the parents, vanilla
averaging, OT fusion and permutation matching, interpolation curves, and a fine-tune of 10% of
a parent's steps.

    python -m launch.fusion_experiments --config configs/fusion_bert_shakespeare.py [--quick]
"""

import ml_collections

from configs import bert_shakespeare_mlm, common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False)
    quick = ",quick" if args.quick else ""
    prefix = "quick_" if args.quick else ""
    config = ml_collections.ConfigDict()
    config.name = "bert"
    config.parent = "configs/bert_shakespeare_mlm.py"
    # (workdir under the root, argument string): model A first, the anchor of every alignment.
    config.runs = ((f"{prefix}mlm_s0", f"seed=0{quick}"), (f"{prefix}mlm_s1", f"seed=1{quick}"))
    config.metrics = ("loss",)
    config.select = "loss"  # what validation choices minimise (epsilon, best variant)
    # Quick: evaluate on a sixteenth of each split (the whole experiment evaluates ~80 times).
    config.eval_shards = 16 if args.quick else 1
    config.activations = dict(examples=16 if args.quick else 256, batch_size=8 if args.quick
                              else 32)
    config.variants = dict(
        ot_weights_exact=dict(cost="weights", solver="exact"),
        ot_weights_sinkhorn=dict(cost="weights", solver="sinkhorn"),
        ot_activations_exact=dict(cost="activations", solver="exact"),
        ot_activations_sinkhorn=dict(cost="activations", solver="sinkhorn"))
    config.epsilons = (0.05,) if args.quick else (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
    config.residual_policies = ("average", "incoming", 0.75)
    config.curve_points = 2 if args.quick else 11
    # 10% of a parent's steps, with the parents' recipe (quick: the quick config's 4 steps).
    steps = bert_shakespeare_mlm.get_config().train.steps // 10
    config.finetune = dict(arg="seed=0,quick" if args.quick else f"seed=0,steps={steps}",
                           dir=f"{prefix}mlm_finetune")
    config.headline = "ot_activations_sinkhorn"  # OT soft, over vanilla, on test
    return config
