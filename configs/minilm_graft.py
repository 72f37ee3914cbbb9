"""Grafting (Panigrahi et al., 2023) on MiniLM-L6 rotten_tomatoes sentiment: learn which entries
of a finished fine-tune θft (``finetuned``, a workdir; default the soup run lr=1e-4 seed=1)
carry its skill. Scores over every embedding, encoder and pooler entry start at the top
``density`` entries by movement and train by plain SGD, as in the paper (which used 1e7; the
score gradient carries σ'(±10) ≈ 4.5e-5). At 3e8 for 100 steps, an entry whose mean gradient
at the start exceeds about 1 / (lr · steps) ≈ 3e-11 can cross γ = 1/2: about 0.05% of them on
MiniLM (measured on three batches). ``train/graft_density`` logs the share with γ > 1/2. The
classifier is θft's, frozen. The run's own evaluation is of the relaxed graft γ = σ(S);
``launch/graft.py`` rounds it and scores the pre, fine-tuned and grafted models on test.

    python -m launch.graft --finetuned /work/runs/merge/sent_lr1e-4_s1 --workdir runs/graft
    python -m launch.main --config configs/minilm_graft.py:finetuned=DIR --workdir runs/graft
    python -m launch.main --config configs/minilm_graft.py:quick,finetuned=DIR ...   (smoke test)
"""

from configs import common, minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, finetuned="runs/merge/sent_lr1e-4_s1",
                            density=1e-4, lr=3e8, steps=100)
    config = minilm_rotten_tomatoes.get_config("quick" if args.quick else None)
    config.method = dict(name="graft", finetuned=args.finetuned, density=args.density)
    config.optim.name = "sgd"
    config.optim.momentum = 0.0
    config.optim.learning_rate = args.lr
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.optim.weight_decay = ()
    config.optim.grad_clip_norm = 0.0  # a clip would undo the rate
    if not args.quick:
        config.train.steps = args.steps
        config.train.eval_every = 0
        config.checkpoint.every = args.steps
        config.checkpoint.keep = 1
    return config
