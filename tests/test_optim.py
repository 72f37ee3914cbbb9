"""Optimizer rules: frozen leaves get no state, per-path learning-rate and decay rules."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from research import tree
from research.train import optim


def params():
    return {"embed": {"embedding": jnp.ones((5, 4))},
            "layer": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
            "head": {"kernel": jnp.ones((4, 2))}}


def config(**kw):
    base = dict(name="sgd", learning_rate=0.1, momentum=0.0, schedule="constant")
    return ml_collections.ConfigDict({**base, **kw})


def test_frozen_leaves_have_no_optimizer_state():
    p = params()
    mask = optim.trainable_mask(p, frozen_patterns=["embed/.*"])
    train, frozen = tree.split(p, mask)
    state = optim.make_optimizer(config(name="adamw"), train, 10).init(train)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths and not any("embed" in path for path in paths)
    assert tree.count(frozen) == 20


def test_trainable_patterns_then_frozen():
    mask = optim.trainable_mask(params(), frozen_patterns=["layer/bias"],
                                trainable_patterns=["layer/.*", "head/.*"])
    assert tree.flatten(mask) == {"embed/embedding": False, "layer/kernel": True,
                                  "layer/bias": False, "head/kernel": True}


def test_lr_multipliers_and_weight_decay_rules():
    p = {"layer": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}, "head": {"kernel": jnp.ones((2,))}}
    tx = optim.make_optimizer(config(lr_multipliers=[("head/.*", 10.0)],
                                     weight_decay=[(".*kernel", 0.5)]), p, 10)
    grads = jax.tree.map(jnp.ones_like, p)
    updates, _ = tx.update(grads, tx.init(p), p)
    # sgd: -lr * mult * (g + wd * p)
    np.testing.assert_allclose(updates["layer"]["kernel"], -0.1 * 1.5)
    np.testing.assert_allclose(updates["layer"]["bias"], -0.1 * 1.0)
    np.testing.assert_allclose(updates["head"]["kernel"], -1.0 * 1.5)


def test_unknown_names_and_unmatched_rules_are_one_line_errors():
    with pytest.raises(ValueError, match="config.optim.name='adamx' is not one of"):
        optim.make_optimizer(config(name="adamx"), params(), 10)
    with pytest.raises(ValueError, match="config.optim.schedule='cosinus'"):
        optim.make_optimizer(config(schedule="cosinus"), params(), 10)
    with pytest.raises(ValueError, match="lr_multipliers rule 'haed/.*' matches no parameter"):
        optim.make_optimizer(config(lr_multipliers=[("haed/.*", 2.0)]), params(), 10)


def test_warmup_then_linear_decay():
    schedule = optim.learning_rate_schedule(config(schedule="linear", warmup_steps=10), 110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 0.1)
    np.testing.assert_allclose(float(schedule(60)), 0.05, rtol=1e-5)
    assert isinstance(optim.make_optimizer(config(), params(), 5), optax.GradientTransformation)
