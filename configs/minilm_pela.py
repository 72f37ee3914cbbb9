"""PELA (Guo et al., 2024) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment: every
encoder kernel factorised at rank 96 by truncated SVD (attention 384x384 -> 50% of its size, MLP
384x1536 -> 31%; the encoder's kernels shrink from 10.6M to 4.0M parameters, the model from
22.7M to 16.1M), then trained with the task loss plus feature distillation from the
uncompressed model at every encoder layer's output. Only the factors and the heads train.
Everything else is the default experiment (``minilm_rotten_tomatoes.py``).

    python -m launch.main --config configs/minilm_pela.py --workdir runs/pela_r96
    python -m launch.main --config configs/minilm_pela.py:quick ...   (smoke test)
"""

from configs import minilm_rotten_tomatoes


def get_config(arg: str | None = None):
    config = minilm_rotten_tomatoes.get_config(arg)
    config.method = dict(name="pela", targets=((r"encoder/.*/kernel", 96),),
                         distill_weight=1.0, distill_sites=((r"encoder/layer_\d+", 1.0),),
                         also_train=(r"classifier/.*", r"pooler/.*"))
    # The factors start as the pretrained weights' leading components, not at zero as LoRA's
    # B does, so they keep full fine-tuning's learning rate.
    config.optim.weight_decay = ((r".*/(kernel|pela_u|pela_v)", 0.01),)
    return config
