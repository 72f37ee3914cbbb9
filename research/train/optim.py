"""Optimizers from config with per-path rules (big_vision style).

Which leaves train, their learning-rate multipliers and their weight decay are all ordered
``(regex, value)`` rules over path names. Frozen leaves are split off before the optimizer sees
the tree, so they carry no optimizer state and no gradient buffers (layer-wise learning-rate
decay from "Bag of Tricks" is just a list of multiplier rules).
"""

from __future__ import annotations

import jax
import optax

from research import tree as tree_lib

OPTIMIZERS = ("adamw", "sgd", "lion", "adafactor")
SCHEDULES = ("constant", "linear", "cosine")


def trainable_mask(params, frozen_patterns=(), trainable_patterns=None) -> dict:
    """True for leaves that train. ``trainable_patterns`` (if given) selects what trains;
    ``frozen_patterns`` then removes leaves from that set."""
    if trainable_patterns is None:
        trainable = jax.tree.map(lambda _: True, dict(params))
    else:
        trainable = tree_lib.mask_from_patterns(trainable_patterns, params, what="trainable rule")
    frozen = tree_lib.mask_from_patterns(frozen_patterns, params, what="frozen rule")
    return jax.tree.map(lambda t, f: bool(t and not f), trainable, frozen)


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
    peak, warmup = config.learning_rate, int(config.get("warmup_steps", 0))
    name = config.get("schedule", "constant")
    decay_steps = max(total_steps - warmup, 1)
    if name == "constant":
        after = optax.constant_schedule(peak)
    elif name == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    elif name == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        raise ValueError(f"config.optim.schedule={name!r} is not one of {SCHEDULES}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def scale_by_tree(factors) -> optax.GradientTransformation:
    """Multiply each update leaf by its own constant (learning-rate multipliers)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates, factors), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def add_decayed_weights_tree(decays) -> optax.GradientTransformation:
    """Decoupled weight decay with a per-leaf coefficient (zero for biases and norms, say)."""
    def update(updates, state, params):
        return jax.tree.map(lambda u, p, d: u if d == 0.0 else u + d * p,
                            updates, params, decays), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config, trainable_params, total_steps: int) -> optax.GradientTransformation:
    """The optax transformation for ``config.optim`` over the trainable tree only.

    Keys: name, learning_rate, schedule, warmup_steps, weight_decay (float or rules),
    lr_multipliers (rules), grad_clip_norm, b1, b2, eps, momentum.
    """
    schedule = learning_rate_schedule(config, total_steps)
    name = config.get("name", "adamw")
    if name == "adamw":
        core = optax.scale_by_adam(b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                                   eps=config.get("eps", 1e-8))
    elif name == "sgd":
        core = optax.trace(decay=config.get("momentum", 0.9))
    elif name == "lion":
        core = optax.scale_by_lion(b1=config.get("b1", 0.9), b2=config.get("b2", 0.99))
    elif name == "adafactor":
        core = optax.scale_by_factored_rms()
    else:
        raise ValueError(f"config.optim.name={name!r} is not one of {OPTIMIZERS}")

    decay = config.get("weight_decay", 0.0)
    decay_rules = [(".*", decay)] if isinstance(decay, (int, float)) else list(decay)
    decays = tree_lib.tree_from_rules(decay_rules, trainable_params, default=0.0,
                                      what="config.optim.weight_decay rule")
    multipliers = tree_lib.tree_from_rules(list(config.get("lr_multipliers", ())),
                                           trainable_params, default=1.0,
                                           what="config.optim.lr_multipliers rule")
    parts = []
    if config.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts += [core, add_decayed_weights_tree(decays), optax.scale_by_learning_rate(schedule),
              scale_by_tree(multipliers)]
    return optax.chain(*parts)

