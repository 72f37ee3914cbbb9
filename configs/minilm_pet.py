"""Pattern-exploiting training (Schick & Schütze, 2021) on real pretrained MiniLM-L6, few-shot:
32 labelled rotten_tomatoes sentiment reviews, each read as the cloze "<review> It was [MASK]."
and scored by the masked-LM logits of "terrible" (rotten) and "great" (fresh) at the mask. The
encoder and a fresh masked-LM head train (all-MiniLM-L6-v2 ships none; the decoder is the frozen
word table, see research/adapters/pet.py); the embeddings stay frozen. Evaluation: the whole
validation split.

    python -m launch.main --config configs/minilm_pet.py --workdir runs/pet
    python -m launch.main --config configs/minilm_pet.py:shots=100 --workdir runs/pet_100
    python -m launch.main --config configs/minilm_pet.py:quick ...   (smoke test)
"""

from configs import common, minilm_rotten_tomatoes

SENTIMENT_TRAIN = 10202  # rotten_tomatoes/sentiment's training examples


def few_shot(config, shots: int) -> None:
    """Train on one contiguous slice of at least ``shots`` sentiment examples (exactly 32 for
    32; TFDS stores them hashed, so a slice is a random subset): the loader's ``shard_count``
    on the training stream only, so evaluation still reads whole splits."""
    if not 1 <= shots <= SENTIMENT_TRAIN:
        raise ValueError(f"config argument shots={shots} is not in [1, {SENTIMENT_TRAIN}]")
    config.data.train_options = dict(shard_count=SENTIMENT_TRAIN // shots)
    config.train.batch_size = min(config.train.batch_size, shots)


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, shots=32)
    config = minilm_rotten_tomatoes.get_config("quick" if args.quick else None)
    config.method = dict(name="pet", pattern="{text} It was [MASK].",
                         verbalizer=("terrible", "great"), also_train=(r"encoder/.*",))
    config.train.batch_size = 16
    few_shot(config, args.shots)
    config.train.eval_every = 0
    if not args.quick:
        config.train.steps = 250  # PET's training steps per model
    # PET fine-tunes the language model at 1e-5 (AdamW, decay 0.01); the fresh head starts
    # from nothing, so it learns 100 times faster.
    config.optim.learning_rate = 1e-5
    config.optim.lr_multipliers = ((r"mlm/.*", 100.0),)
    config.optim.weight_decay = ((r".*/kernel", 0.01),)
    return config
