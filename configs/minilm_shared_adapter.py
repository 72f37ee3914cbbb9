"""VL-Adapter's shared adapters (Sung et al., 2022) on real pretrained MiniLM-L6 for both
rotten_tomatoes tasks at once, sentiment and subjectivity: one set of Houlsby adapters (384 -> 48
-> 384, GELU, after the attention output projection and after the MLP of every layer) shared by
the tasks, one classifier per task, the layer norms trained with the adapters (as VL-Adapter
does), the rest frozen. Everything else is the default experiment (``minilm_rotten_tomatoes.py``),
with twice its steps: the tasks take turns, so each gets the single-task run's 250.

    python -m launch.multitask --config configs/minilm_shared_adapter.py --workdir runs/shared
    python -m launch.multitask --config configs/minilm_shared_adapter.py:quick ...   (smoke test)
"""

from configs import common, minilm_rotten_tomatoes

TASKS = ("rotten_tomatoes/sentiment", "rotten_tomatoes/subjectivity")


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False)
    config = minilm_rotten_tomatoes.get_config("quick" if args.quick else None)
    config.method = dict(name="shared_adapter", tasks=TASKS, reduction_factor=8,
                         nonlinearity="gelu", also_train=(r"encoder/.*_norm/(scale|bias)",))
    if not args.quick:
        config.train.steps *= len(TASKS)
    config.train.eval_every = 0  # launch.multitask evaluates at the end only
    # VL-Adapter's single-adapter run: reduction factor 8, layer norms unfrozen, AdamW at 1e-3.
    config.optim.learning_rate = 1e-3
    # Decay on matrices only: pulling the norms' scales towards 0 would undo them.
    config.optim.weight_decay = ((r".*/(kernel|task_kernel)", 0.01),)
    return config
