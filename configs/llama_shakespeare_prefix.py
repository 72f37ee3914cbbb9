"""Personalised models (Zlotchevski et al., 2022): prefix tuning, a project-specific prefix of
key/value rows at every layer of the frozen base, on one slice of Shakespeare, from a base run.
The shared recipe is in ``llama_shakespeare_lightweight.py``.

    python -m launch.main --config configs/llama_shakespeare_prefix.py:init_from=runs/base \
        --workdir runs/prefix
"""

from configs import llama_shakespeare_lightweight


PREFIX = 16  # virtual tokens


def get_config(arg: str | None = None):
    # PEFT's prefix-tuning examples train at 1e-2 (AdamW), as minilm_prefix_tuning.py does.
    config = llama_shakespeare_lightweight.personalise(
        arg, dict(name="prefix_tuning", num_virtual_tokens=PREFIX, encoder="decoder"), 1e-2)
    # Room for the prefix before a 128-byte window: rotary positions have no table, so the
    # base's params fit as they are.
    config.model.overrides = dict(max_length=128 + PREFIX)
    # No decay on the prefixes: pulling keys and values towards zero is no neutral prior.
    config.optim.weight_decay = ()
    return config
