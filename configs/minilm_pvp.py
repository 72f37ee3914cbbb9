"""PVP (Song et al., 2023, "PVP: Pre-trained Visual Parameter-Efficient Tuning"): pretrain the
PEFT modules first, then tune them on the downstream task, instead of starting them from
scratch. Here the module is a prompt (prompt tuning on real pretrained MiniLM-L6): the
``pretrain`` stage tunes it on rotten_tomatoes subjectivity, the ``tune`` stage on sentiment,
starting from the pretrain run's prompt through ``config.model.init_from`` (a run's exported
prompt, which the model lacks, starts this run's prompt of the same path and shape:
``research.train.loop.init_params``). Both tasks are binary, so the subjectivity classifier
starts the sentiment one too. ``tune`` without ``init_from`` is the baseline PVP compares
against: a prompt drawn from vocabulary rows.

    python -m launch.main --config configs/minilm_pvp.py:stage=pretrain --workdir runs/pvp_pre
    python -m launch.main --config configs/minilm_pvp.py:stage=tune,init_from=runs/pvp_pre \
        --workdir runs/pvp
    python -m launch.main --config configs/minilm_pvp.py:stage=tune --workdir runs/pvp_baseline
    ...:stage=tune,init_from=runs/pvp_pre,shots=32   (PVP's low-data regime)
"""

from configs import common, minilm_pet, minilm_prompt_tuning

STAGES = {"pretrain": "subjectivity", "tune": "sentiment"}


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, quick=False, stage="pretrain", init_from="", shots=0)
    if args.stage not in STAGES:
        raise ValueError(f"config argument stage={args.stage!r} is not one of {list(STAGES)}")
    if args.stage == "pretrain" and (args.init_from or args.shots):
        raise ValueError("config arguments init_from and shots are for stage=tune")
    config = minilm_prompt_tuning.get_config(
        f"task={STAGES[args.stage]}" + (",quick" if args.quick else ""))
    config.model.init_from = args.init_from
    if args.shots:
        minilm_pet.few_shot(config, args.shots)
    return config
