"""VeRA (Kopiczko et al., 2024) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: one
pair of frozen random rank-256 matrices shared by every encoder layer's query and value
projections (PEFT's default targets and rank), two learned scaling vectors per projection, the
classifier trained whole, the rest frozen.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_vera.py --workdir runs/vera
    python -m launch.main --config configs/minilm_vera.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_vera.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    config.method = dict(name="vera", targets=(r"encoder/.*/attn/(query|value)/kernel",),
                         rank=256, also_train=(r"classifier/.*",))
    # The paper trains the vectors (and the head) of RoBERTa on SST-2 at 4e-3: a handful of
    # scaling vectors over frozen random projections needs a far larger rate than LoRA.
    config.optim.learning_rate = 4e-3
    # The vectors match no decay rule, on purpose: decay would pull lambda_d towards 0, where
    # the update vanishes, rather than towards its start.
    return config
