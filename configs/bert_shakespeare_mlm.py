"""A tiny BERT encoder (2 layers, width 128) pretrained from scratch with masked LM on
Shakespeare (WordPiece, 64-token windows; held-out plays for validation and test). Two seeds
give the parents of the BERT case of OT fusion (``launch/fusion_experiments.py``).

    python -m launch.main --config configs/bert_shakespeare_mlm.py:seed=1 --workdir runs/mlm_s1
    python -m launch.main --config configs/bert_shakespeare_mlm.py:quick --workdir /tmp/mlm_quick
"""

from configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, steps=600, lr=1e-3, seed=0)
    config = common.base_config()
    config.seed = args.seed
    config.data.name = "shakespeare"
    config.data.options = dict(tokenizer="wordpiece", max_length=64)
    config.model.name = "bert_tiny_mlm"
    # No dropout: the parents should differ by their seed only, and the fused model is
    # compared with them on loss, where dropout only slows a short run down.
    config.model.overrides = dict(hidden_dropout=0.0, attention_dropout=0.0, max_length=64)
    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    common.train_from_scratch(config, args.steps, args.lr)
    if args.quick:
        common.make_quick(config)
    return config
