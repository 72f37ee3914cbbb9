"""Masked Thought (Chen et al., 2024) on the smallest honest SFT task: a tiny random-init Llama
reads the first half of a 128-byte window of Shakespeare (the prompt) and is scored on
continuing it (the target); during training a share ``rate`` of the target's input bytes is
replaced by a mask byte (NUL, which the text never contains), labels unchanged. Evaluation is
unmasked, on the held-out plays. ``rate=0`` is plain SFT, the baseline.

    python -m launch.main --config configs/llama_masked_thought.py --workdir runs/masked_thought
    python -m launch.main --config configs/llama_masked_thought.py:rate=0 --workdir runs/sft
    python -m launch.main --config configs/llama_masked_thought.py:quick --workdir /tmp/mft_quick
"""

from configs import common


def get_config(arg: str | None = None):
    # The paper tunes the rate per dataset; 0.2 is a moderate choice for a from-scratch model.
    args = common.parse_arg(arg, quick=False, steps=600, rate=0.2, lr=3e-3, seed=0)
    config = common.base_config()
    config.seed = args.seed
    config.data.name = "shakespeare/sft"
    config.data.options = dict(tokenizer="char", max_length=128, prompt_length=64)
    config.data.train_options = dict(mask_rate=args.rate)  # training stream only
    config.model.name = "llama_tiny_lm"
    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    common.train_from_scratch(config, args.steps, args.lr)
    if args.quick:
        common.make_quick(config)
    return config
