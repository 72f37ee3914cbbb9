"""DePT as a tree transform: leaves and trainable count; a fresh pair leaves the text's
embeddings exactly as they were while the encoder sees ``l`` more tokens and every head keeps its
output shape; the pair is a position-wise update that merges into the position table; padding
stays masked and [CLS] is read; under the loop only the prompt, factors and head move, each at
its own learning rate; bad input is a one-line error."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import minilm_dept
from research import methods, models, tree
from research.lowrank import lora as lora_lib
from research.lowrank.dept import DePT
from research.train import loop, optim

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0, num_classes=3)
L, N, R = 7, 3, 2  # text length, prompt length, rank
METHOD = DePT(prompt_length=N, rank=R, alpha=4.0, also_train=(r"classifier/.*",))


def tiny_model(head="classifier"):
    return models.build(f"bert_tiny_{head}", **TINY)


def random_params(model, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32),
                        model.param_shapes())


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, (2, L)).astype(np.int32)
    mask = np.ones((2, L), np.int32)
    mask[1, 5:] = 0  # right padding
    return ids, mask, np.zeros_like(ids)


@functools.partial(jax.jit, static_argnums=(0, 1))
def forward(model, method, params, ids, mask, types):
    """``(outputs, encoder input x)``: the model through ``method`` (None: plain)."""
    seen = {}

    def probe(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path == ("encoder",):
            seen["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(probe):
        if method is None:
            out = model.module.apply({"params": params}, ids, mask, types)
        else:
            out = method.apply(model.module, {"params": params}, ids, mask, types).outputs
    return out, seen["x"]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    params = random_params(model)
    return model, params, METHOD.init(jax.random.key(1), params)


def test_leaves_axes_and_trainable_count():
    model = tiny_model()
    shapes = jax.eval_shape(METHOD.init, jax.random.key(0), model.param_shapes())
    flat = tree.flatten(shapes)
    assert flat["embeddings/prompt"].shape == (N, 32)
    # LoRA's layout on the position table: A [positions, r], B [r, embed].
    assert flat["embeddings/position/lora_a"].shape == (32, R)
    assert flat["embeddings/position/lora_b"].shape == (R, 32)
    logical = tree.flatten(METHOD.logical_axes(loop.abstract_params(model)[1], shapes))
    assert logical["embeddings/prompt"] == (None, "embed")
    assert logical["embeddings/position/lora_a"] == ("position", None)

    mask = tree.flatten(optim.trainable_mask(shapes, (), METHOD.trainable))
    trainable = {p for p, t in mask.items() if t}
    assert trainable == {"embeddings/prompt", "embeddings/position/lora_a",
                         "embeddings/position/lora_b", "classifier/kernel", "classifier/bias"}
    count = sum(int(np.prod(flat[p].shape)) for p in trainable)
    assert count == N * 32 + R * (32 + 32) + (32 * 3 + 3)  # l·E + r·(max_length + E) + head
    assert isinstance(methods.build(dict(name="dept", prompt_length=N, rank=R)), DePT)


def test_fresh_pair_keeps_text_embeddings_and_the_prompt_lengthens_the_encoder_input(tiny):
    model, params, adapted = tiny
    flat = tree.flatten(adapted)
    assert not np.any(flat["embeddings/position/lora_b"])  # B = 0: no update yet
    assert np.abs(flat["embeddings/position/lora_a"]).max() <= 1 / np.sqrt(R)
    table = np.asarray(flat["embeddings/word/embedding"])
    for row in np.asarray(flat["embeddings/prompt"]):  # sampled-vocabulary init
        assert np.any(np.all(table == row, axis=1))

    ids, mask, types = batch()
    (base, x_base), (ours, x_ours) = (forward(model, m, p, ids, mask, types)
                                      for m, p in ((None, params), (METHOD, adapted)))
    assert x_ours.shape == (2, L + N, 32) and x_base.shape == (2, L, 32)
    # [CLS] first, the prompt next, then the text with its embeddings (and positions) unchanged.
    text = np.concatenate([x_ours[:, :1], x_ours[:, 1 + N:]], axis=1)
    np.testing.assert_array_equal(text, x_base)
    assert ours.shape == base.shape == (2, 3)

    encoder = tiny_model("encoder")
    sequence, pooled = forward(encoder, METHOD, adapted, ids, mask, types)[0]
    assert sequence.shape == (2, L, 32) and pooled.shape == (2, 32)  # prompt rows dropped


def test_pair_is_a_position_wise_update_that_merges_into_the_position_table(tiny):
    model, params, adapted = tiny
    ids, mask, types = batch()
    rng = np.random.default_rng(2)
    flat = dict(tree.flatten(adapted))
    flat["embeddings/position/lora_b"] = jnp.asarray(rng.normal(0, 0.3, (R, 32)), jnp.float32)
    trained = tree.unflatten(flat)

    ours, x_ours = forward(model, METHOD, trained, ids, mask, types)
    fresh, x_fresh = forward(model, METHOD, adapted, ids, mask, types)
    assert np.abs(np.asarray(ours) - np.asarray(fresh)).max() > 1e-3
    np.testing.assert_array_equal(x_ours[:, 1:1 + N], x_fresh[:, 1:1 + N])  # prompt untouched
    # Folding s·A·B into the position table gives the same model (text keeps positions 0..L-1).
    merged = lora_lib.merge(trained, METHOD.lora)
    assert "embeddings/position/lora_a" not in tree.flatten(merged)
    theirs, _ = forward(model, METHOD, merged, ids, mask, types)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_padding_stays_masked_and_the_head_reads_cls(tiny):
    model, _, adapted = tiny
    ids, mask, types = batch()
    ours, _ = forward(model, METHOD, adapted, ids, mask, types)
    other = ids.copy()
    other[1, 5:] = (other[1, 5:] + 7) % 100  # change only row 1's padded tokens
    again, _ = forward(model, METHOD, adapted, other, mask, types)
    np.testing.assert_allclose(again, ours, atol=1e-6)
    rng = np.random.default_rng(3)
    shifted = tree.map_with_path(
        lambda p, x: x + rng.normal(0, 0.5, x.shape) if p == "embeddings/prompt" else x, adapted)
    moved, _ = forward(model, METHOD, shifted, ids, mask, types)
    assert np.abs(np.asarray(moved) - np.asarray(ours)).min() > 1e-4  # [CLS] attends the prompt


def test_gradients_reach_the_prompt_and_both_factors(tiny):
    model, _, adapted = tiny
    flat = dict(tree.flatten(adapted))
    flat["embeddings/position/lora_b"] = jnp.asarray(  # with B = 0, A's gradient is zero
        np.random.default_rng(4).normal(0, 0.3, (R, 32)), jnp.float32)
    mask = optim.trainable_mask(tree.unflatten(flat), (), METHOD.trainable)
    trainable, frozen = tree.split(tree.unflatten(flat), mask)
    ids, mask_, types = batch()

    @jax.jit
    def grads(trainable):
        def loss(trainable):
            logits = METHOD.apply(model.module, {"params": tree.combine(trainable, frozen)},
                                  ids, mask_, types).outputs
            return -jnp.mean(jax.nn.log_softmax(logits)[:, 0])
        return jax.grad(loss)(trainable)

    assert set(tree.flatten(trainable)) == {
        "embeddings/prompt", "embeddings/position/lora_a", "embeddings/position/lora_b",
        "classifier/kernel", "classifier/bias"}
    flat_grads = tree.flatten(grads(trainable))
    for path, g in flat_grads.items():
        assert np.abs(g).max() > 1e-6, path
    # Only A's rows for the positions the text used (0..L-1) have a gradient.
    g_a = np.abs(np.asarray(flat_grads["embeddings/position/lora_a"]))
    assert g_a[:L].max(axis=1).min() > 1e-6 and not g_a[L:].any()


def test_the_config_gives_prompt_and_pair_their_own_learning_rates():
    config = minilm_dept.get_config("quick")
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = dict(TINY, num_classes=2)
    config.mesh = dict(data=1)
    config.optim.update(name="sgd", momentum=0.0, schedule="constant", warmup_steps=0,
                        weight_decay=(), grad_clip_norm=0.0)
    setup = loop.make_setup(config, loop.build_model(config), 2, devices=jax.devices()[:1])
    ones = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), setup.abstract_state["trainable"])
    # The loop's optimizer: sgd's update is -lr·mult·g.
    updates = tree.flatten(setup.tx.update(ones, setup.tx.init(ones), ones)[0])
    rate = {"embeddings/prompt": minilm_dept.PROMPT_LR,
            "embeddings/position/lora_a": minilm_dept.PAIR_LR,
            "embeddings/position/lora_b": minilm_dept.PAIR_LR}
    assert set(rate) < set(updates)
    for path, update in updates.items():
        np.testing.assert_allclose(update, -rate.get(path, minilm_dept.HEAD_LR), rtol=1e-6,
                                   err_msg=path)


def test_config_file_builds_a_dept_run():
    config = minilm_dept.get_config("quick")
    setup = loop.make_setup(config, loop.build_model(config), 4, devices=jax.devices()[:1])
    shapes = tree.flatten(setup.abstract_state["trainable"])
    head = sum(int(np.prod(shapes[p].shape)) for p in shapes
               if p.startswith(("classifier/", "pooler/")))
    assert tree.count(setup.abstract_state["trainable"]) == 10 * 384 + 4 * (512 + 384) + head


def test_bad_input_is_a_one_line_error(tiny):
    _, params, adapted = tiny
    with pytest.raises(ValueError, match=r"DePT prompt_length=0 is not a positive integer"):
        DePT(prompt_length=0)
    with pytest.raises(ValueError, match=r"DePT embedding='embeddings/wrd/embedding' is not a "
                                         r"parameter; closest: embeddings/word/embedding"):
        DePT(embedding="embeddings/wrd/embedding").init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"LoRA rank 40 for embeddings/position/embedding "
                                         r"exceeds its smaller side"):
        DePT(rank=40).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"DePT prompt 'embeddings/prompt' is not in the params"):
        METHOD.apply(tiny_model().module, {"params": params}, *batch())
    with pytest.raises(ValueError, match=r"DePT encoder='encodr' is not a module; closest: "):
        DePT(prompt_length=N, rank=R, encoder="encodr").apply(
            tiny_model().module, {"params": adapted}, *batch())
    with pytest.raises(ValueError, match=r"config.method for 'dept'.*prefix_length") as info:
        methods.build(dict(name="dept", prefix_length=4))
    assert "\n" not in str(info.value)
