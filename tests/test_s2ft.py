"""S²FT: co-permuting heads (whole key/value groups under GQA) and FFN channels keeps the
function; training under the loop changes, after merging back, only the selected heads' rows of
``attn/out`` and the selected channels' rows of ``mlp/wo``; the step skips the frozen weight
gradients (XLA FLOPs); bad options are one-line errors naming the option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import methods, models, tree
from research.sparse import s2ft
from research.sparse.s2ft import S2FT
from research.train import loop
from test_lora import _batch, _setup
from tests.tiny_bert import forward, random_params, tiny_model, token_batch


def _random_orders(params, seed=0):
    rng = np.random.default_rng(seed)
    return {module: rng.permutation(site.units)
            for module, site in s2ft.sites(tree.flatten(params)).items()}


def test_co_permutation_preserves_the_function():
    model = tiny_model()
    params = random_params(model)
    ids, mask, types = token_batch()
    orders = _random_orders(params)
    assert sorted(orders) == [f"encoder/layer_{i}/{m}" for i in (0, 1) for m in ("attn", "mlp")]
    permuted = s2ft.permute(params, orders)
    assert not np.array_equal(tree.flatten(permuted)["encoder/layer_0/mlp/wo/kernel"],
                              tree.flatten(params)["encoder/layer_0/mlp/wo/kernel"])
    for x, y in zip(forward(model, None, params, ids, mask, types),
                    forward(model, None, permuted, ids, mask, types)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)

    # Fresh S2FT: same outputs through the split output projections; merge is exact.
    method = S2FT(heads=2, channels=0.25)
    adapted = method.init(jax.random.key(0), params)
    for x, y in zip(forward(model, None, params, ids, mask, types),
                    forward(model, method, adapted, ids, mask, types)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, s2ft.merge(adapted), params)
    # Moved slices: the merged plain model computes what the adapted one does.
    rng = np.random.default_rng(1)
    moved = tree.map_with_path(lambda p, x: x + rng.normal(0, 0.3, x.shape).astype(np.float32)
                               if p.endswith(s2ft.ROWS) else x, adapted)
    for x, y in zip(forward(model, method, moved, ids, mask, types),
                    forward(model, None, s2ft.merge(moved), ids, mask, types)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


def test_gqa_permutes_whole_key_value_groups_and_swiglu_channels():
    model = models.build("llama_tiny_lm", num_layers=1)  # 4 query heads over 2 kv heads
    params = random_params(model)
    ids = token_batch(vocab=256)[0]
    found = s2ft.sites(tree.flatten(params))
    attn, mlp = found["decoder/layer_0/attn"], found["decoder/layer_0/mlp"]
    assert (attn.units, attn.unit_rows, mlp.units) == (2, 2, 128)
    apply = jax.jit(lambda p: model.module.apply({"params": p}, ids))
    permuted = s2ft.permute(params, {attn.module: np.array([1, 0]),
                                     mlp.module: np.random.default_rng(0).permutation(128)})
    np.testing.assert_allclose(apply(params), apply(permuted), rtol=0, atol=1e-5)

    method = S2FT(heads=1, channels=4, selection="weight_norm")
    adapted = method.init(jax.random.key(0), params)
    assert method.trainable_for(adapted) == (s2ft.ROWS_PATTERN,)  # the LM head stays frozen
    flat = tree.flatten(adapted)
    assert flat[attn.rows_path].shape == (2, 16, 64)  # one group: two query heads' rows
    assert flat[mlp.rows_path].shape == (4, 64)
    norms = np.linalg.norm(tree.flatten(params)["decoder/layer_0/mlp/down/kernel"], axis=1)
    np.testing.assert_array_equal(np.sort(flat[mlp.order_path][:4]),
                                  np.sort(np.argsort(-norms)[:4]))
    np.testing.assert_allclose(apply(params), jax.jit(lambda p: method.apply(
        model.module, {"params": p}, ids).outputs)(adapted), rtol=0, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, s2ft.merge(adapted), params)


S2FT_METHOD = dict(name="s2ft", heads=1, channels=0.125, selection="random", seed=3)


def _state(setup, params):
    """The loop's train state for ``params`` (``loop.init_state`` would compile the model's
    random init, the slowest part of this file)."""
    trainable, frozen = tree.split(setup.method.init(None, params), setup.trainable)
    state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0)),
             "trainable": trainable, "frozen": frozen, "opt_state": setup.tx.init(trainable)}
    return jax.device_put(state, setup.state_shardings)


def test_training_touches_only_the_selected_rows_and_skips_frozen_weight_gradients():
    _, full = _setup(dict(name="full"))
    _, setup = _setup(S2FT_METHOD)
    batch = _batch(setup, 8, 32)
    # XLA's FLOP count of the steps (before optimisation: no frozen weight gradient is ever
    # emitted, so compiling, which is slow, changes nothing here).
    lowered = {name: loop.make_train_step(one).lower(one.abstract_state, batch)
               for name, one in (("full", full), ("s2ft", setup))}
    flops = {name: float(one.cost_analysis()["flops"]) for name, one in lowered.items()}
    assert flops["s2ft"] / flops["full"] < 0.7, flops

    assert isinstance(setup.method, S2FT)
    state = _state(setup, random_params(setup.model))
    trainable = set(tree.flatten(state["trainable"]))
    assert trainable == {f"encoder/layer_{i}/{m}/s2ft_kernel" for i in (0, 1)
                         for m in ("attn/out", "mlp/wo")} | {"classifier/kernel",
                                                             "classifier/bias"}
    assert set(tree.flatten(state["opt_state"][1].mu)) == trainable
    before = jax.device_get(tree.combine(state["trainable"], state["frozen"]))
    step = lowered["s2ft"].compile()
    for index in range(3):
        state, _ = step(state, _batch(setup, 8, 32, seed=index))
    after = jax.device_get(tree.combine(state["trainable"], state["frozen"]))

    base, trained = tree.flatten(s2ft.merge(before)), tree.flatten(s2ft.merge(after))
    assert set(base) == set(trained) and not any("s2ft" in p for p in base)
    orders = tree.flatten(before)
    selected = {}  # original indices of the selected rows, from the stored permutations
    for i in (0, 1):
        selected[f"encoder/layer_{i}/attn/out/kernel"] = orders[
            f"encoder/layer_{i}/attn/s2ft_order"][:1]             # 1 of 4 heads
        selected[f"encoder/layer_{i}/mlp/wo/kernel"] = orders[
            f"encoder/layer_{i}/mlp/s2ft_order"][:16]             # 12.5% of 128 channels
    for path, old in base.items():
        new = trained[path]
        if path in selected:
            changed = np.flatnonzero(np.any((new != old).reshape(len(old), -1), axis=1))
            np.testing.assert_array_equal(changed, np.sort(selected[path]), err_msg=path)
        elif not path.startswith("classifier/"):
            np.testing.assert_array_equal(new, old, err_msg=path)


def test_bad_options_are_one_line_errors():
    params = tiny_model().param_shapes()
    with pytest.raises(ValueError, match=r"S2FT heads=5 for encoder/layer_0/attn exceeds its "
                                         r"4 heads"):
        S2FT(heads=5).plan(params)
    for bad in (1.5, 0.0, -1):
        with pytest.raises(ValueError, match=rf"S2FT channels={bad} .*fraction in \(0, 1\]"):
            S2FT(channels=bad)
    with pytest.raises(ValueError, match=r"S2FT heads rule '.*/nothing' matches no parameter"):
        S2FT(heads=((r".*/nothing", 1),)).plan(params)
    with pytest.raises(ValueError, match="selection='magnitude' is not one of"):
        S2FT(selection="magnitude")
    with pytest.raises(ValueError, match="config.method for 's2ft'.*rank"):
        methods.build(dict(name="s2ft", rank=4))
    with pytest.raises(ValueError) as info:
        S2FT(heads=5).plan(params)
    assert "\n" not in str(info.value)
