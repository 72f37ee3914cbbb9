"""Houlsby adapters (Houlsby et al., 2019) on real pretrained MiniLM-L6 for rotten_tomatoes
sentiment: a bottleneck adapter (384 -> 24 -> 384, GELU) after the attention output projection
and after the MLP of every encoder layer, inside the residual before the post-LN; as in the
paper the layer norms train with them, and the classifier trains whole; the rest is frozen.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_houlsby.py --workdir runs/houlsby
    python -m launch.main --config configs/minilm_houlsby.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_houlsby.py:placement=parallel ...   (He et al.)
    python -m launch.main --config configs/minilm_houlsby.py:quick ...   (smoke test)
"""

from configs import common, minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, task="sentiment", placement="sequential")
    config = minilm_rotten_tomatoes.get_config(f"task={args.task}" + (",quick" if args.quick
                                                                      else ""))
    config.method = dict(name="houlsby", reduction_factor=16, nonlinearity="gelu",
                         placement=args.placement,
                         also_train=(r"classifier/.*", r"encoder/.*_norm/(scale|bias)"))
    # The paper sweeps {3e-5, 3e-4, 3e-3}; adapters starting at the identity need the middle
    # one at least, and this run is short (under an epoch).
    config.optim.learning_rate = 3e-4
    # Decay on matrices only: pulling the norms' scales towards 0 would undo them.
    config.optim.weight_decay = ((r".*/kernel", 0.01),)
    return config
