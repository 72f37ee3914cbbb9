"""LoKr (Edalati et al., 2022, KronA; as in LyCORIS) on real pretrained MiniLM-L6 for
rotten_tomatoes sentiment: rank-8 Kronecker updates beside every encoder kernel and the
pooler's (384 = 16 x 24 and 1536 = 32 x 48, so at rank 8 both factors are full matrices), the
classifier trained whole, the rest frozen.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_lokr.py --workdir runs/lokr_r8
    python -m launch.main --config configs/minilm_lokr.py:task=subjectivity ...
    python -m launch.main --config configs/minilm_lokr.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    # alpha = 2r as in PEFT's LoKr benchmark runs (r=32, alpha=64).
    config.method = dict(name="lokr", targets=((r"(encoder/.*|pooler)/kernel", 8),), alpha=16.0,
                         also_train=(r"classifier/.*",))
    # PEFT's tuned LoKr benchmark run trains at 3e-3 (its LoRA runs at 1e-4).
    config.optim.learning_rate = 3e-3
    config.optim.weight_decay = ((r".*/(kernel|lokr_w[12](_[ab])?)", 0.01),)
    return config
