"""S²FT (Yang et al., 2024) on pretrained MiniLM-L6 for rotten_tomatoes sentiment, set up like
the full fine-tuning runs of ``minilm_soup.py`` (150 steps, the same classifier init) so the two
compare directly. In each of the 6 blocks 5% of the heads (1 of 12) and of the FFN channels (77
of 1536) train, in the output projections only; the classifier and pooler train whole (the
pooler because the sentence-transformers checkpoint never tuned it for [CLS]). About 1.8% of the
parameters train (1.1% in the slices).

    python -m launch.main --config configs/minilm_s2ft.py --workdir runs/sparse/s2ft
    python -m launch.main --config configs/minilm_s2ft.py:heads=0.1,channels=0.1,lr=2e-3 ...
    python -m launch.main --config configs/minilm_s2ft.py:quick ...   (smoke test)
"""

from configs import common, minilm_soup


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, lr=1e-3, heads=0.05, channels=0.05, selection="random",
                            seed=1, task="sentiment", quick=False)
    config = minilm_soup.get_config(f"lr={args.lr},seed={args.seed},task={args.task}"
                                    + (",quick" if args.quick else ""))
    config.method = dict(name="s2ft", heads=args.heads, channels=args.channels,
                         selection=args.selection, seed=0,
                         also_train=(r"classifier/.*", r"pooler/.*"))
    # So few entries move at full fine-tuning's 1e-4 too slowly for 150 steps: 10x that.
    config.optim.weight_decay = ((r".*/(kernel|s2ft_kernel)", 0.01),)
    return config
