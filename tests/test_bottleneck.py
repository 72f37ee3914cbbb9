"""Houlsby and Pfeiffer bottleneck adapters as tree transforms: sites, shapes, axes and what
trains; fresh adapters change nothing; one post-LN (BERT) and one pre-LN (ViT) block against
numpy, which places the adapter inside the residual branch before the norm (an adapter after the
LayerNorm, or around the residual sum, fails them); export keeps the adapters and the method
still runs them; training moves only the adapters; bad input is a one-line error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from research import methods, models, tree
from research.adapters import bottleneck as bottleneck_lib
from research.adapters.bottleneck import Houlsby, Pfeiffer
from research.models.attention import make_mask
from research.models.layers import Block
from research.train import loop, optim
from tests.tiny_bert import (
    tiny_model, random_tree, token_batch, forward, gap, one_line, loop_config, loop_setup,
    random_batch, assert_only_trainable_moved
)


def randomize_adapters(params, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    return tree.map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0.0, scale, x.shape), jnp.float32)
        if "/adapter/" in p else x, params)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, random_tree(model.param_shapes())


def test_sites_shapes_axes_and_what_trains():
    model = tiny_model("classifier")
    shapes = model.param_shapes()
    method = Houlsby(also_train=(r"classifier/.*",))
    init_shapes = jax.eval_shape(method.init, jax.random.key(0), shapes)
    added = {p: s.shape for p, s in tree.flatten(init_shapes).items() if "/adapter/" in p}
    # d = 32, reduction factor 16: m = 2, after attn/out and mlp/wo of both blocks.
    for layer in ("layer_0", "layer_1"):
        for site in ("attn/out", "mlp/wo"):
            prefix = f"encoder/{layer}/{site}/adapter"
            assert added.pop(f"{prefix}/down/kernel") == (32, 2)
            assert added.pop(f"{prefix}/down/bias") == (2,)
            assert added.pop(f"{prefix}/up/kernel") == (2, 32)
            assert added.pop(f"{prefix}/up/bias") == (32,)
    assert not added

    logical = tree.flatten(method.logical_axes(loop.abstract_params(model)[1], init_shapes))
    assert logical["encoder/layer_0/mlp/wo/adapter/down/kernel"] == ("embed", None)
    assert logical["encoder/layer_0/mlp/wo/adapter/up/kernel"] == (None, "embed")
    assert logical["encoder/layer_0/attn/out/adapter/up/bias"] == ("embed",)

    mask = tree.flatten(optim.trainable_mask(init_shapes, (), method.trainable))
    assert {p for p, t in mask.items() if t} == (
        {p for p in tree.flatten(init_shapes) if "/adapter/" in p}
        | {"classifier/kernel", "classifier/bias"})

    pfeiffer = methods.build(dict(name="pfeiffer", bottleneck=5))
    assert isinstance(pfeiffer, Pfeiffer) and pfeiffer.nonlinearity == "relu"
    plan = pfeiffer.plan(shapes)
    assert list(plan) == ["encoder/layer_0/mlp/wo", "encoder/layer_1/mlp/wo"]
    assert {site.bottleneck for site in plan.values()} == {5}
    houlsby = methods.build(dict(name="houlsby"))
    assert isinstance(houlsby, Houlsby) and houlsby.nonlinearity == "gelu"
    # Blocks are chosen by rules, first match wins: an exclusion can precede a broad rule.
    ruled = Houlsby(targets=[[r".*/layer_0/.*", False], r"encoder/.*/(attn/out|mlp/wo)"])
    assert list(ruled.plan(shapes)) == ["encoder/layer_1/attn/out", "encoder/layer_1/mlp/wo"]
    # Llama's MLP ends in mlp/down, without biases: the adapter keeps its own.
    llama = models.build("llama_tiny_lm", num_layers=1)
    llama_params = random_tree(llama.param_shapes())
    method = Houlsby()
    assert list(method.plan(llama_params)) == ["decoder/layer_0/attn/out",
                                               "decoder/layer_0/mlp/down"]
    ids = np.arange(1, 9, dtype=np.int32)[None]
    adapted = method.init(jax.random.key(0), llama_params)
    plain = llama.module.apply({"params": llama_params}, ids)
    assert gap(method.apply(llama.module, {"params": adapted}, ids).outputs, plain) == 0.0
    moved = method.apply(llama.module, {"params": randomize_adapters(adapted)}, ids).outputs
    assert gap(moved, plain) > 1e-2


def test_fresh_adapters_leave_outputs_unchanged(tiny):
    model, params = tiny
    ids, mask, types = token_batch()
    plain = forward(model, None, params, ids, mask, types)
    for method in (Houlsby(), Pfeiffer(reduction_factor=4, nonlinearity="tanh")):
        adapted = method.init(jax.random.key(0), params)
        down = tree.flatten(adapted)["encoder/layer_0/mlp/wo/adapter/down/kernel"]
        assert 0 < np.abs(down).max() <= 2 * method.init_scale  # truncated at two stds
        for x, y in zip(plain, forward(model, method, adapted, ids, mask, types)):
            assert gap(x, y) < 1e-6  # exact up to the compiler's fusion
        # And the adapters do act once they move, through a scanned stack as well.
        moved = randomize_adapters(adapted)
        ours = forward(model, method, moved, ids, mask, types)
        assert gap(ours[0], plain[0]) > 1e-2
        scanned = tiny_model(scan_layers=True)
        assert gap(forward(scanned, method, moved, ids, mask, types)[0], ours[0]) < 1e-5


# --- one block against numpy -----------------------------------------------------------------


def layer_norm(x, p, eps=1e-12):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def attention(x, p):
    def project(name):
        return np.einsum("ble,ehd->blhd", x, p[name]["kernel"]) + p[name]["bias"]
    q, k, v = project("query"), project("key"), project("value")
    scores = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = np.einsum("bhlm,bmhd->blhd", weights, v)
    return np.einsum("blhd,hde->ble", context, p["out"]["kernel"]) + p["out"]["bias"]


def mlp(x, p):
    hidden = x @ p["wi"]["kernel"] + p["wi"]["bias"]
    hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
    return hidden @ p["wo"]["kernel"] + p["wo"]["bias"]


def adapter(h, p, act):
    down, up = p["adapter"]["down"], p["adapter"]["up"]
    return h + act(h @ down["kernel"] + down["bias"]) @ up["kernel"] + up["bias"]


def relu(x):
    return np.maximum(x, 0)


def block_case(pre_norm: bool, method, seed=3):
    config = tiny_model(pre_norm=pre_norm).config
    x = np.random.default_rng(seed).normal(size=(2, 5, 32))
    layer = random_tree(tiny_model().param_shapes()["encoder"]["layer_0"], seed)
    layer = randomize_adapters(method.init(jax.random.key(1), layer), seed + 1)
    f = jax.tree.map(lambda v: np.asarray(v, np.float64), layer)
    ours = method.apply(Block(config), {"params": layer}, jnp.asarray(x, jnp.float32),
                        make_mask(None, False), True).outputs
    return x, f, np.asarray(ours, np.float64)


def test_post_ln_block_against_numpy():
    """Houlsby in BERT: ``LN(x + a(attn(x)))`` then ``LN(y + a(mlp(y)))``."""
    method = Houlsby(reduction_factor=4, nonlinearity="relu")
    x, f, ours = block_case(False, method)
    a, m = f["attn"], f["mlp"]
    y = layer_norm(x + adapter(attention(x, a), a["out"], relu), f["attn_norm"])
    want = layer_norm(y + adapter(mlp(y, m), m["wo"], relu), f["mlp_norm"])
    assert gap(ours, want) < 1e-4
    # The placements the test must tell apart: the adapter after the LayerNorm, or around the
    # residual sum, compute something else.
    y_after = adapter(layer_norm(x + attention(x, a), f["attn_norm"]), a["out"], relu)
    after_ln = adapter(layer_norm(y_after + mlp(y_after, m), f["mlp_norm"]), m["wo"], relu)
    y_around = layer_norm(adapter(x + attention(x, a), a["out"], relu), f["attn_norm"])
    around = layer_norm(adapter(y_around + mlp(y_around, m), m["wo"], relu), f["mlp_norm"])
    assert gap(ours, after_ln) > 1e-2 and gap(ours, around) > 1e-2


def test_pre_ln_block_against_numpy():
    """Pfeiffer in a pre-LN block (ViT, Llama): ``y + a(mlp(LN(y)))``, attention untouched."""
    method = Pfeiffer(bottleneck=3)
    x, f, ours = block_case(True, method, seed=5)
    assert "adapter" not in f["attn"]["out"]
    a, m = f["attn"], f["mlp"]
    y = x + attention(layer_norm(x, f["attn_norm"]), a)
    want = y + adapter(mlp(layer_norm(y, f["mlp_norm"]), m), m["wo"], relu)
    assert gap(ours, want) < 1e-4
    around = adapter(y + mlp(layer_norm(y, f["mlp_norm"]), m), m["wo"], relu)
    assert gap(ours, around) > 1e-2


def side(h, p, act, scaling):
    """The adapter's own term ``s·up(act(down(h)))`` (``adapter`` adds ``h``)."""
    return scaling * (adapter(h, p, act) - h)


def test_parallel_adapters_read_the_sublayer_input_against_numpy():
    """He et al.'s parallel form: post-LN ``LN(x + f(x) + s·a(x))``; pre-LN
    ``x + f(LN x) + s·a(LN x)``, with s scaling only the adapter."""
    method = Houlsby(reduction_factor=4, nonlinearity="relu", placement="parallel", scaling=4.0)
    x, f, ours = block_case(False, method)
    a, m = f["attn"], f["mlp"]
    y = layer_norm(x + attention(x, a) + side(x, a["out"], relu, 4.0), f["attn_norm"])
    want = layer_norm(y + mlp(y, m) + side(y, m["wo"], relu, 4.0), f["mlp_norm"])
    assert gap(ours, want) < 1e-4
    # Sequential with the same leaves and s reads the sublayer's output: another function.
    sequential = Houlsby(reduction_factor=4, nonlinearity="relu", scaling=4.0)
    _, _, theirs = block_case(False, sequential)
    y_seq = layer_norm(x + attention(x, a) + side(attention(x, a), a["out"], relu, 4.0),
                       f["attn_norm"])
    want_seq = layer_norm(y_seq + mlp(y_seq, m) + side(mlp(y_seq, m), m["wo"], relu, 4.0),
                          f["mlp_norm"])
    assert gap(theirs, want_seq) < 1e-4 and gap(ours, theirs) > 1e-2

    x, f, ours = block_case(True, Pfeiffer(bottleneck=3, placement="parallel"), seed=5)
    a, m = f["attn"], f["mlp"]
    y = x + attention(layer_norm(x, f["attn_norm"]), a)
    normed = layer_norm(y, f["mlp_norm"])
    assert gap(ours, y + mlp(normed, m) + side(normed, m["wo"], relu, 1.0)) < 1e-4


def test_parallel_adapters_under_a_scan_and_a_cls_only_last_block():
    """The classifier's last block computes the [CLS] row alone: the parallel adapter reads
    that row of the sublayer's input, as the full encoder does."""
    method = Houlsby(placement="parallel", scaling=2.0)
    classifier = tiny_model("classifier", num_classes=3)
    params = random_tree(classifier.param_shapes(), 4)
    moved = randomize_adapters(method.init(jax.random.key(0), params))
    ids, mask, types = token_batch()
    logits = forward(classifier, method, moved, ids, mask, types)
    encoder = tiny_model()
    pooled = forward(encoder, method, {k: v for k, v in moved.items() if k != "classifier"},
                     ids, mask, types)[1]
    head = moved["classifier"]
    assert gap(logits, pooled @ head["kernel"] + head["bias"]) < 1e-5
    assert gap(forward(tiny_model("classifier", num_classes=3, scan_layers=True), method, moved,
                       ids, mask, types), logits) < 1e-5
    assert gap(logits, forward(classifier, Houlsby(scaling=2.0), moved, ids, mask, types)) > 1e-3


def test_export_keeps_the_adapters_which_cannot_fold(tiny):
    model, params = tiny
    ids, mask, types = token_batch()
    method = Houlsby()
    adapted = randomize_adapters(method.init(jax.random.key(0), params))
    exported = method.export(adapted)
    tree.check_same_structure(exported, adapted)
    assert gap(forward(model, method, exported, ids, mask, types)[0],
               forward(model, method, adapted, ids, mask, types)[0]) == 0.0
    # The plain model skips them: running an export needs the method.
    assert gap(forward(model, None, exported, ids, mask, types)[0],
               forward(model, method, adapted, ids, mask, types)[0]) > 1e-2


def test_training_under_the_loop_moves_only_the_adapters():
    setup, state = loop_setup(loop_config(dict(name="houlsby", reduction_factor=8,
                                               also_train=(r"classifier/.*",))))
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    assert set(trainable) == {f"encoder/layer_0/{site}/adapter/{part}/{leaf}"
                              for site in ("attn/out", "mlp/wo") for part in ("down", "up")
                              for leaf in ("kernel", "bias")} | {"classifier/kernel",
                                                                 "classifier/bias"}
    batch = random_batch(setup)
    step = loop.make_train_step(setup)
    # Two steps: with ``up`` at zero the first one moves ``up`` only, the second ``down`` too.
    state, _ = step(state, batch)
    state, _ = step(state, batch)
    assert_only_trainable_moved(before, jax.device_get(state))


def test_config_files_build_houlsby_and_pfeiffer():
    from configs import minilm_houlsby, minilm_pfeiffer

    shapes = models.build("minilm_l6_classifier", num_classes=2).param_shapes()
    for module, kind, sites_per_layer in ((minilm_houlsby, Houlsby, 2),
                                          (minilm_pfeiffer, Pfeiffer, 1)):
        config = module.get_config("quick")
        method = methods.build(config.method)
        assert isinstance(method, kind) and config.train.steps == 4
        plan = method.plan(shapes)
        assert len(plan) == sites_per_layer * 6
        assert {site.bottleneck for site in plan.values()} == {384 // 16}
        mask = tree.flatten(optim.trainable_mask(
            jax.eval_shape(method.init, jax.random.key(0), shapes), (), method.trainable))
        assert mask["classifier/kernel"] and not mask["encoder/layer_0/mlp/wo/kernel"]
        # Houlsby et al. train the layer norms with the adapters.
        assert mask["encoder/layer_0/mlp_norm/scale"] == (kind is Houlsby)


def test_bad_input_is_a_one_line_error(tiny):
    _, params = tiny
    cases = [
        (dict(reduction_factor=5), (r"config.method.reduction_factor=5 does not divide the "
                                    r"width 32 of encoder/layer_0/attn/out; pick a divisor or "
                                    r"set config.method.bottleneck")),
        (dict(bottleneck=0), r"config.method.bottleneck=0 is not an integer >= 1"),
        (dict(reduction_factor=0), r"config.method.reduction_factor=0 is not an integer >= 1"),
        (dict(nonlinearity="sigmoid"), (r"config.method.nonlinearity='sigmoid' is not one of "
                                        r"\['gelu', 'relu', 'swish', 'tanh'\]")),
        (dict(targets=(r"encoder/.*/mlp/woo",)), (r"houlsby target rule 'encoder/.\*/mlp/woo' "
                                                  r"matches no parameter; closest: encoder/")),
        (dict(targets=(r"encoder/layer_0/attn/query",)),
         (r"houlsby target encoder/layer_0/attn/query outputs \[4, 8\]; an adapter maps a "
          r"layer with one output axis")),
        (dict(targets=()), r"houlsby target rules are empty"),
        (dict(init_scale=0.0), r"config.method.init_scale=0.0 is not a number > 0"),
        (dict(placement="serial"), (r"config.method.placement='serial' is not one of "
                                    r"\['sequential', 'parallel'\]")),
        (dict(scaling="4"), r"config.method.scaling='4' is not a number"),
        (dict(placement="parallel", targets=(r"encoder/.*/mlp/wi",)),
         (r"houlsby target encoder/layer_0/mlp/wi is no sublayer's output layer; a parallel "
          r"adapter sits beside an attention or MLP sublayer, at attn/out, mlp/wo or mlp/down")),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            Houlsby(**options).plan(params)
        one_line(info)
    with pytest.raises(ValueError, match="config.method for 'pfeiffer'.*rank"):
        methods.build(dict(name="pfeiffer", rank=4))
    assert bottleneck_lib.NONLINEARITIES.keys() == {"gelu", "relu", "swish", "tanh"}
