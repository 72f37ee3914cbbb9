"""HFT (Hui et al., 2024, "HFT: Half Fine-Tuning for Large Language Models") on real pretrained
MiniLM-L6 for rotten_tomatoes sentiment: each round trains a freshly drawn half of the attention
and MLP matrices (two of query/key/value/out and one of wi/wo per layer) and the classifier; the
other half, the norms, the embeddings and the pooler stay frozen. 150 steps per round at full
fine-tuning's learning rate, like the merge runs (``minilm_soup.py``).

Round r starts from round r-1's last checkpoint (``prev``; round 0 starts from the pretrained
weights):

    python -m launch.main --config configs/minilm_hft.py --workdir runs/hft/r0
    for r in 1 2; do python -m launch.main \
        --config configs/minilm_hft.py:round=$r,prev=runs/hft/r$((r-1)) --workdir runs/hft/r$r; done
    python -m launch.main --config configs/minilm_hft.py:quick ...   (smoke test)
"""

from configs import common, minilm_soup


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, lr=1e-4, seed=1, steps=150, task="sentiment", round=0,
                            prev="", quick=False)
    if args.round > 0 and not args.prev:
        raise ValueError(f"config argument round={args.round} needs prev=<workdir of round "
                         f"{args.round - 1}>")
    config = minilm_soup.get_config(f"lr={args.lr},seed={args.seed},steps={args.steps},"
                                    f"task={args.task}" + (",quick" if args.quick else ""))
    config.method = dict(name="hft", round=args.round, seed=args.seed)
    if args.round > 0:
        config.model.init_from = args.prev
    return config
