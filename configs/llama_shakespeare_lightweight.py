"""Personalised models (Zlotchevski et al., 2022, "Exploring and Evaluating Personalized Models
for Code Generation") on the smallest honest stand-in: a tiny Llama language model of
Shakespeare (bytes, 128-byte windows) personalised to one "project", a contiguous slice of the
training plays (``shard`` of ``shards``), from a base run (``init_from``). Held-out plays
evaluate. The paper's three ways, one config each, differ in what trains:

- lightweight fine-tuning (this file): the token embeddings and the output layer;
- ``llama_shakespeare_last_layer.py``: the last block (and the final norm before the head);
- ``llama_shakespeare_prefix.py``: a prefix of key/value rows at every layer, nothing else.

Custom fine-tuning (all parameters) is this file with ``--config.method.name=full``. A base:
plain SFT of the same model on every training play,

    python -m launch.main --config configs/llama_masked_thought.py:rate=0 --workdir runs/base
    python -m launch.main --config configs/llama_shakespeare_lightweight.py:init_from=runs/base \
        --workdir runs/lightweight
    python -m launch.main --config configs/llama_shakespeare_lightweight.py:quick ...  (smoke)
"""

from configs import common


def personalise(arg: str | None, method: dict, learning_rate: float):
    """The shared run: ``method`` on the project slice at ``learning_rate`` (the ``lr``
    argument overrides it)."""
    args = common.parse_arg(arg, quick=False, init_from="", shard=0, shards=8, steps=300,
                            lr=learning_rate, seed=0)
    if not 0 <= args.shard < args.shards:
        raise ValueError(f"config argument shard={args.shard} is not in [0, "
                         f"shards={args.shards})")
    config = common.base_config()
    config.seed = args.seed
    config.data.name = "shakespeare"
    config.data.options = dict(tokenizer="char", max_length=128)
    # The project: one contiguous slice of the training stream (a few plays).
    config.data.train_options = dict(shard_index=args.shard, shard_count=args.shards)
    config.model.name = "llama_tiny_lm"  # llama_masked_thought.py's model, so its runs are bases
    config.model.init_from = args.init_from
    config.method = method
    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    common.train_from_scratch(config, args.steps, args.lr)  # its schedule; the base is init_from
    if args.quick:
        common.make_quick(config)
    return config


def get_config(arg: str | None = None):
    return personalise(arg, dict(name="lightweight"), 1e-3)
