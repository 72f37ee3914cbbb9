"""Polyhistor (Liu et al., 2022) on real pretrained MiniLM-L6 for both rotten_tomatoes tasks at
once, sentiment and subjectivity: one hyper-network, shared by the tasks and the 12 adapter sites
(attention output and MLP of every layer), generates each task's Houlsby adapters (384 -> 24 ->
384, GELU) from a task and a layer embedding as 32 x 6 templates of rank 4, which per-site
scaling kernels (12 x 4) scale up by a Kronecker product; each task has its own classifier; the
model is frozen. 29,380 trained parameters for both tasks (Houlsby at this width: 226,080
per task).
Everything else is the default experiment (``minilm_rotten_tomatoes.py``), with twice its steps:
the tasks take turns, so each gets the single-task run's 250.

    python -m launch.multitask --config configs/minilm_polyhistor.py --workdir runs/polyhistor
    python -m launch.multitask --config configs/minilm_polyhistor.py:quick ...   (smoke test)
"""

from configs import common, minilm_rotten_tomatoes

TASKS = ("rotten_tomatoes/sentiment", "rotten_tomatoes/subjectivity")


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False)
    config = minilm_rotten_tomatoes.get_config("quick" if args.quick else None)
    config.method = dict(name="polyhistor", tasks=TASKS, reduction_factor=16, template=(32, 6),
                         rank=4, embedding_dim=32, hidden_dim=64)
    if not args.quick:
        config.train.steps *= len(TASKS)
    config.train.eval_every = 0  # launch.multitask evaluates at the end only
    # VL-Adapter's benchmark trains Hyperformer's adapter hyper-network with AdamW at 1e-3.
    config.optim.learning_rate = 1e-3
    # Decay on the hyper-network's matrices and the heads only: decaying the scaling kernels or
    # the embeddings would pull the adapters back to zero.
    config.optim.weight_decay = ((r"polyhistor/(hidden_weights|down_u|down_v|up_u|up_v|"
                                  r"down_bias|up_bias)", 0.01), (r"classifier/task_kernel", 0.01))
    return config
