"""LT-SFT on MiniLM: full fine-tuning, the top ``density`` of entries by |Δ|, reset to θ0 and
retrain only those (the task head trains whole), ``rounds`` times with a geometric density
schedule. ``python -m launch.lt_sft`` runs it for sentiment and subjectivity and composes the
two sparse deltas.

    python -m launch.lt_sft --root runs/lt_sft
    python -m launch.lt_sft --root runs/lt_sft --finetuned sentiment=runs/merge/sent_lr1e-4_s1
"""

from configs import common, minilm_soup


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, task="sentiment", density=0.05, rounds=1, lr=1e-4,
                            sparse_lr=0.0, quick=False)
    config = minilm_soup.get_config(f"task={args.task},lr={args.lr}"
                                    + (",quick" if args.quick else ""))
    config.lt_sft = dict(
        density=args.density, rounds=args.rounds,
        # The retraining learning rate (0: the full fine-tune's).
        sparse_lr=args.sparse_lr or args.lr,
        # Entries eligible for the mask: the encoder; the new head trains whole.
        rules=((r"classifier/.*", False), (r".*", True)),
        dense=(r"classifier/.*",))
    return config
