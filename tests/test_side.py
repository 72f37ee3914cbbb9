"""Side networks beside a frozen backbone (hierarchical side-tuning, visual query tuning, LEVI):
no gradient reaches the backbone, even where its leaves are marked trainable; each method's
wiring against a hand-written numpy formula (HST's side network on BERT's taps, VQT's queries
through a ViT block, LEVI's layer-wise ensemble); VQT leaves every real token's output as the
plain model's and trains in a small fraction of full fine-tuning's memory; LEVI without its
small model is the frozen model through its head; only the method's leaves and the head train
under the loop; the configs build; bad input is a one-line error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from research import methods, models, sites, tree
from research.adapters import side
from research.adapters.side import Levi, SideTuning, VisualQueryTuning
from research.train import loop
from tests.tiny_bert import random_params, one_line

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0, num_classes=3)
VIT = dict(hidden_size=32, num_heads=4, mlp_dim=64)
BLOCKS = ("encoder/layer_0", "encoder/layer_1")


def moved(method, params, seed=5, scale=0.2):
    """``params`` with every leaf of the method drawn afresh (zero-started ones included)."""
    rng = np.random.default_rng(seed)
    return tree.map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0.0, scale, x.shape), x.dtype)
        if method.owns(p) else x, params)


def plain_features(model, params, inputs):
    """The plain model's logits and the outputs of its embeddings and blocks."""
    def run(params, *inputs):
        features = {}
        with sites.capture({"embeddings", *BLOCKS}, features):
            logits = model.module.apply({"params": params}, *inputs)
        return logits, features
    return jax.jit(run)(params, *inputs)


@pytest.fixture(scope="module")
def bert():
    """The model, random params, inputs (one row padded), and the plain logits and features."""
    model = models.build("bert_tiny_classifier", **TINY)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    params, inputs = random_params(model), (ids, mask, np.zeros_like(ids))
    return model, params, inputs, *plain_features(model, params, inputs)


@pytest.fixture(scope="module")
def vit():
    model = models.build("vit_tiny_classifier", **VIT)
    params = random_params(model, seed=1)
    inputs = (np.random.default_rng(1).normal(size=(3, 28, 28, 1)).astype(np.float32),)
    return model, params, inputs, *plain_features(model, params, inputs)


def outputs_of(method, model):
    return jax.jit(lambda params, *inputs: method.apply(model.module, {"params": params},
                                                       *inputs).outputs)


def layer_norm(x, scale, bias, eps):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps) * scale + bias


def dense(p, x):
    return x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def pre_ln_block(p, rows, keys, eps, padding=None):
    """A pre-LN GELU block (ViT's, and the side networks' narrow ones) written out, for the
    residual rows ``rows`` attending over ``keys`` (``padding``: which keys are real):
    ``h = rows + out(softmax(q k / sqrt(d)) v)`` on normed inputs, then
    ``h + wo(gelu(wi(norm(h))))``."""
    p = jax.tree.map(np.asarray, p)

    def proj(name, y):
        return np.einsum("bte,ehd->bthd", y, p["attn"][name]["kernel"]) + p["attn"][name]["bias"]

    def norm(name, y):
        return layer_norm(y, p[name]["scale"], p[name]["bias"], eps)

    q, k, v = (proj(name, norm("attn_norm", y)) for name, y in
               (("query", rows), ("key", keys), ("value", keys)))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if padding is not None:
        scores = np.where(padding[:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("bhqk,bkhd->bqhd", probs, v)
    h = rows + np.einsum("bqhd,hde->bqe", context, p["attn"]["out"]["kernel"]) \
        + p["attn"]["out"]["bias"]
    inner = dense(p["mlp"]["wi"], norm("mlp_norm", h))
    return h + dense(p["mlp"]["wo"], 0.5 * inner * (1 + erf(inner / np.sqrt(2))))


# ---------------------------------------------------------------------------------------------
# Each method against numpy; no gradient reaches the backbone
# ---------------------------------------------------------------------------------------------

EVERYTHING = (r".*",)  # also_train: the backbone marked trainable too


def with_gradients(method, model, capture=()):
    """A jitted ``(params, *inputs) -> ((logits, features at capture, method state), grads)``
    of a fixed linear function of the logits, every leaf differentiated."""
    weights = np.random.default_rng(2).normal(size=(3, model.config.num_classes))

    def loss(params, *inputs):
        features = {}
        with sites.capture(set(capture), features):
            logits, state = method.run(model.module, {"params": params}, *inputs)
        return jnp.sum(logits * weights), (logits, features, state)

    grad = jax.grad(loss, has_aux=True)
    return jax.jit(lambda params, *inputs: grad(params, *inputs)[::-1])


def check_no_gradient_reaches_the_backbone(method, grads) -> None:
    """The backbone's gradient is exactly zero although every leaf was marked trainable; the
    method's leaves and the classifier take gradients (but the key biases: softmax ignores a
    bias shared by every key)."""
    grads = tree.flatten(grads)
    backbone = [p for p in grads if p.startswith(("embeddings/", "encoder/layer_"))]
    assert backbone and all(not np.any(grads[p]) for p in backbone), backbone
    own = [p for p in grads if method.owns(p) and not p.endswith("attn/key/bias")]
    assert own and all(np.any(grads[p]) for p in own + ["classifier/kernel"])


def test_side_tuning_against_numpy_and_no_gradient_into_the_backbone(bert):
    """Stage i adds down_i(tap_i) to the side state and runs side block i; the last block's
    [CLS]-only tap feeds row 0, whose stage computes only it; up(norm(s)) replaces the last
    block's output, which BERT's pooler and classifier read. With every leaf marked trainable,
    the backbone still takes no gradient: the taps sit behind stop_gradient."""
    model, base, inputs, _, taps = bert
    method = SideTuning(width=8, heads=2, also_train=EVERYTHING)
    params = moved(method, method.init(jax.random.key(0), base))
    (ours, _, _), grads = with_gradients(method, model)(params, *inputs)
    check_no_gradient_reaches_the_backbone(method, grads)
    assert method.export(params) is params  # nothing folds: the side leaves stay

    h0, h1 = np.asarray(taps["encoder/layer_0"]), np.asarray(taps["encoder/layer_1"])
    assert h1.shape[1] == 1  # the classifier's last block computes [CLS] alone
    own, padding = params["side_tuning"], inputs[1].astype(bool)
    s = dense(own["down_0"], h0)
    s = pre_ln_block(own["layer_0"], s, s, 1e-6, padding)
    s[:, :1] += dense(own["down_1"], h1)
    s = pre_ln_block(own["layer_1"], s[:, :1], s, 1e-6, padding)
    y = dense(own["up"], layer_norm(s, own["norm"]["scale"], own["norm"]["bias"], 1e-6))
    pooled = np.tanh(dense(base["pooler"], y[:, 0]))
    np.testing.assert_allclose(ours, dense(base["classifier"], pooled), atol=2e-5)


def test_vqt_against_numpy_real_tokens_unchanged_and_no_gradient_into_the_backbone(vit):
    """Real tokens: every block's output is the plain model's, and at init (head at zero) so
    are the logits. Queries: each block, written out in numpy, on its queries in front of its
    input; the logits add the flattened summaries times the head. With every leaf marked
    trainable the backbone takes no gradient (the blocks run the queries on stop_gradient
    weights and inputs)."""
    model, base, inputs, plain, taps = vit
    method = VisualQueryTuning(num_queries=2, also_train=EVERYTHING)
    fresh = method.init(jax.random.key(0), base)
    params = moved(method, fresh)
    run = with_gradients(method, model, BLOCKS)
    np.testing.assert_array_equal(run(fresh, *inputs)[0][0], plain)
    (logits, features, state), grads = run(params, *inputs)
    check_no_gradient_reaches_the_backbone(method, grads)
    for path in BLOCKS:
        np.testing.assert_array_equal(features[path], taps[path], err_msg=path)

    summaries, own = state["summaries"], params["vqt"]
    block_inputs = {"encoder/layer_0": taps["embeddings"],
                    "encoder/layer_1": taps["encoder/layer_0"]}
    for i, path in enumerate(BLOCKS):
        x = np.asarray(block_inputs[path])
        queries = np.broadcast_to(np.asarray(own["queries"][i]), (x.shape[0], 2, x.shape[-1]))
        expected = pre_ln_block(base["encoder"][f"layer_{i}"], queries, x,
                                model.config.norm_eps)
        np.testing.assert_allclose(summaries[path], expected, atol=2e-5, err_msg=path)
    flat = np.concatenate([np.asarray(summaries[p]).reshape(3, -1) for p in BLOCKS], -1)
    np.testing.assert_allclose(logits, plain + flat @ np.asarray(own["head"]["kernel"]),
                               atol=2e-5)


def test_vqt_queries_read_real_tokens_only(bert):
    """A padded token, whatever its id, changes no summary: padding and the queries' own keys
    are masked out alike."""
    model, base, (ids, mask, types), *_ = bert
    method = VisualQueryTuning(num_queries=3)
    params = moved(method, method.init(jax.random.key(0), base))
    summaries = jax.jit(lambda params, ids: method.summaries(
        model.module, {"params": params}, ids, mask, types))
    changed = ids.copy()
    changed[1, 8:] = 7
    first, second = summaries(params, ids), summaries(params, changed)
    for path in BLOCKS:
        assert first[path].shape == (3, 3, 32)
        np.testing.assert_allclose(first[path], second[path], atol=1e-6, err_msg=path)
    assert np.abs(np.asarray(first[BLOCKS[1]]) - np.asarray(first[BLOCKS[0]])).max() > 1e-2


def test_levi_is_the_frozen_model_through_its_head_without_its_small_model(vit):
    """At init the joins are zero and the layer weights on the last layer alone: the plain
    model. Zero joins with any weights: the weighted pretrained taps through the ViT's final
    norm and classifier. Everything moved: the small model (from the embedded patches alone)
    joins each tap through its projection, all in numpy against the method."""
    model, base, inputs, plain, taps = vit
    method = Levi(width=8, heads=2)
    fresh = method.init(jax.random.key(0), base)
    run = outputs_of(method, model)
    np.testing.assert_allclose(run(fresh, *inputs), plain, atol=1e-6)

    eps, final = model.config.norm_eps, jax.tree.map(np.asarray, base["encoder"]["final_norm"])

    def head(features):
        return dense(base["classifier"], layer_norm(features, final["scale"], final["bias"],
                                                    eps)[:, 0])

    params = moved(method, fresh)
    own = params["levi"]
    h = [np.asarray(taps[path])[:, :1] for path in BLOCKS]
    silent = tree.map_with_path(lambda p, x: jnp.zeros_like(x) if "/adapt_" in p else x, params)
    mix = np.asarray(own["mix"])
    np.testing.assert_allclose(run(silent, *inputs), head(mix[0] * h[0] + mix[1] * h[1]),
                               atol=2e-5)

    z = dense(own["embed"], np.asarray(taps["embeddings"]))
    z0 = pre_ln_block(own["layer_0"], z, z, 1e-6)
    z1 = pre_ln_block(own["layer_1"], z0[:, :1], z0, 1e-6)
    joined = [h[0] + dense(own["adapt_0"], z0[:, :1]), h[1] + dense(own["adapt_1"], z1)]
    np.testing.assert_allclose(run(params, *inputs),
                               head(mix[0] * joined[0] + mix[1] * joined[1]), atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Under the training loop
# ---------------------------------------------------------------------------------------------


def loop_config(method, model="bert_tiny_classifier"):
    from configs import common

    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.model.name = model
    # LEVI on one layer: its small block still reads every patch for the [CLS] row it gives.
    config.model.overrides = dict(TINY if model.startswith("bert") else dict(VIT, num_layers=1),
                                  num_classes=2)
    config.train.batch_size = 8
    config.optim.learning_rate = 1e-2
    config.optim.schedule = "constant"
    config.mesh = dict(data=1)
    config.method = method
    return config


def loop_batch(setup, model: str):
    rng = np.random.default_rng(0)
    if model.startswith("vit"):
        return loop.global_batch(setup, {"image": rng.normal(size=(8, 28, 28, 1)).astype(
            np.float32), "label": rng.integers(0, 2, (8,)).astype(np.int32)})
    return loop.global_batch(setup, {
        "input_ids": rng.integers(1, 100, (8, 16)).astype(np.int32),
        "attention_mask": np.ones((8, 16), np.int32),
        "token_type_ids": np.zeros((8, 16), np.int32),
        "label": rng.integers(0, 2, (8,)).astype(np.int32)})


@pytest.mark.parametrize("options, model", [
    (dict(name="side_tuning", width=8, heads=2), "bert_tiny_classifier"),
    (dict(name="levi", width=8, heads=2, also_train=EVERYTHING), "vit_tiny_classifier"),
], ids=["side_tuning", "levi"])
def test_what_trains_under_the_loop(options, model):
    """Two steps (LEVI's joins start at zero, so its small model moves from the second).
    Side-tuning as configured by default: the trainable tree is its leaves and the classifier,
    and they all move (but the key biases: softmax ignores a bias shared by every key). LEVI
    with every leaf trainable: its leaves and the head move, the pretrained model gets no
    gradient and stays exactly as it was. Frozen leaves stay too."""
    def setup_for(options):
        config = loop_config(options, model)
        return config, loop.make_setup(config, loop.build_model(config), 2,
                                       devices=jax.devices()[:1])

    _, default = setup_for({**options, "also_train": side.HEAD})
    trains = set(tree.flatten(default.abstract_state["trainable"]))
    assert {p for p in trains if not p.startswith(options["name"] + "/")} == {
        "classifier/kernel", "classifier/bias"}
    config, setup = setup_for(options)
    state = loop.init_state(config, setup)
    before = jax.device_get(state)
    step, batch = loop.make_train_step(setup), loop_batch(setup, model)
    for _ in range(2):
        state, _ = step(state, batch)
    after = jax.device_get(state)
    for path, value in tree.flatten(before["frozen"]).items():
        np.testing.assert_array_equal(tree.flatten(after["frozen"])[path], value, err_msg=path)
    for path, value in tree.flatten(before["trainable"]).items():
        change = np.abs(tree.flatten(after["trainable"])[path] - value).max()
        if path.startswith(("embeddings/", "encoder/layer_")):
            assert change == 0, path
        elif not path.endswith("attn/key/bias"):
            assert change > 0, path


def step_temporaries(options) -> tuple[int, set]:
    """XLA's temporary bytes of the compiled train step for a 4-layer BERT of width 64 (batch
    16 of 64 tokens), and the leaves that step trains."""
    config = loop_config(options)
    config.model.overrides = dict(TINY, num_classes=2, hidden_size=64, mlp_dim=256,
                                  num_layers=4, max_length=64)
    config.train.batch_size = 16
    setup = loop.make_setup(config, loop.build_model(config), 2, devices=jax.devices()[:1])
    batch = loop.global_batch(setup, {
        "input_ids": np.ones((16, 64), np.int32), "attention_mask": np.ones((16, 64), np.int32),
        "token_type_ids": np.zeros((16, 64), np.int32), "label": np.zeros((16,), np.int32)})
    compiled = loop.make_train_step(setup).lower(setup.abstract_state, batch).compile()
    return (compiled.memory_analysis().temp_size_in_bytes,
            set(tree.flatten(setup.abstract_state["trainable"])))


def test_vqt_trains_in_a_small_fraction_of_full_fine_tunings_memory():
    """The same step (model, batch, optimizer): full fine-tuning keeps every block's
    activations for the backward pass; VQT backpropagates into its queries through one block
    each and keeps little more than those blocks' keys and values. It trains the queries, its
    head and the classifier."""
    full_bytes, _ = step_temporaries(dict(name="full"))
    vqt_bytes, trained = step_temporaries(dict(name="vqt"))
    assert vqt_bytes < 0.2 * full_bytes, (vqt_bytes, full_bytes)  # 0.13 on XLA:CPU
    assert trained == {"vqt/queries", "vqt/head/kernel", "classifier/kernel", "classifier/bias"}


# ---------------------------------------------------------------------------------------------
# Configs and bad input
# ---------------------------------------------------------------------------------------------


def test_config_files_build_their_methods():
    from configs import minilm_side_tuning, vit_mnist5k_levi, vit_mnist5k_vqt

    config = minilm_side_tuning.get_config("quick")
    method = methods.build(config.method)
    assert isinstance(method, SideTuning) and config.train.steps == 4
    shapes = models.build("minilm_l6_classifier", num_classes=2).param_shapes()
    assert method.plan(shapes) == tuple(f"encoder/layer_{i}" for i in range(6))
    added = tree.flatten(jax.eval_shape(method.init, jax.random.key(0), shapes))
    assert added["side_tuning/down_5/kernel"].shape == (384, 64)
    assert added["side_tuning/up/kernel"].shape == (64, 384)
    for module, kind in ((vit_mnist5k_vqt, VisualQueryTuning), (vit_mnist5k_levi, Levi)):
        config = module.get_config("quick")
        assert isinstance(methods.build(config.method), kind) and not config.model.init_from
        assert module.get_config("").model.init_from == "runs/vit_mnist5k"


def test_bad_input_is_a_one_line_error(bert):
    model, base, inputs, *_ = bert
    shapes = model.param_shapes()
    for options, message in [
        (dict(name="side_tuning", width=0), r"config.method.width=0 is not an integer >= 1"),
        (dict(name="levi", width=-3), r"config.method.width=-3 is not an integer >= 1"),
        (dict(name="side_tuning", width=8, heads=3),
         r"config.method.heads=3 does not divide config.method.width=8"),
        (dict(name="vqt", num_queries=0), r"config.method.num_queries=0 is not an integer"),
        (dict(name="vqt", taps=()), r"config.method.taps is empty"),
        (dict(name="levi", rank=4), r"config.method for 'levi'.*rank"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            methods.build(options)
        one_line(info)
    for method, message in [
        (SideTuning(taps=(r"encodr/layer_\d+",)),
         r"config.method.taps pattern 'encodr/layer_.*' matches no module; closest: encoder"),
        (SideTuning(taps=(r"encoder/layer_0/attn",)),
         r"config.method.taps: 'encoder/layer_0/attn' holds no norm scale"),
        (VisualQueryTuning(head="clasifier"), r"config.method.head='clasifier' holds no kernel"),
        (Levi(source="embeddings/wrd"), r"config.method.source='embeddings/wrd' is not a module"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            jax.eval_shape(method.init, jax.random.key(0), shapes)
        one_line(info)
    with pytest.raises(ValueError, match=r"side_tuning: the params hold no side_tuning/ leaves"):
        SideTuning().apply(model.module, {"params": base}, *inputs)
    causal = models.build("bert_tiny_classifier", **TINY, causal=True)
    method = VisualQueryTuning()
    params = jax.eval_shape(method.init, jax.random.key(0), shapes)
    with pytest.raises(ValueError, match=r"vqt: queries in front of the tokens need a "
                                         r"bidirectional model.*causal=True") as info:
        jax.eval_shape(lambda p: method.apply(causal.module, {"params": p}, *inputs).outputs,
                       params)
    one_line(info)
