"""PANDA (Zhong et al., 2022) on real pretrained MiniLM-L6 for rotten_tomatoes sentiment, the
teacher a prompt-tuning run on subjectivity: the target prompt (20 vectors) and classifier start
as the source run's and train on sentiment plus a distillation term, T² · KL at T = 2 between
the teacher's (the frozen model with the source prompt and classifier) and the student's
softened outputs; the rest is frozen. Train the source first:

    python -m launch.main --config configs/minilm_prompt_tuning.py:task=subjectivity \
        --workdir runs/prompt_tuning_subjectivity
    python -m launch.main --config configs/minilm_panda.py --workdir runs/panda
    python -m launch.main --config configs/minilm_panda.py:source=DIR,task=subjectivity ...
    python -m launch.main --config configs/minilm_panda.py:quick ...   (smoke test)

Everything else is prompt tuning's experiment (``minilm_prompt_tuning.py``).
"""

from configs import common, minilm_prompt_tuning


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, task="sentiment",
                            source="runs/prompt_tuning_subjectivity")
    config = minilm_prompt_tuning.get_config(f"task={args.task}" + (",quick" if args.quick
                                                                     else ""))
    config.method = dict(name="panda", source=args.source, num_virtual_tokens=20,
                         also_train=(r"classifier/.*",), temperature=2.0, weight=1.0,
                         distillation="kl")
    # Prompt tuning's rate (``minilm_prompt_tuning.py``): the prompt starts trained, as the
    # source's.
    config.optim.learning_rate = 3e-2
    return config
