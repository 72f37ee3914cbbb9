"""SSF as a tree transform: shapes, axes and what trains; fresh scales and shifts change
nothing; layers and a LayerNorm against numpy (``γ⊙(W·x + b) + β``, the bias scaled too);
export folds every pair into the layer or norm before it, so the plain model (BERT, and a ViT
with its patch convolution and final norm) equals the adapted one; training moves only the
scales and shifts; bad input is a one-line error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import methods, models, tree
from research.adapters import ssf as ssf_lib
from research.adapters.ssf import SSF
from research.train import loop, optim
from tests.tiny_bert import (
    tiny_model, random_tree, token_batch, forward, gap, one_line, loop_config, loop_setup,
    random_batch, assert_only_trainable_moved
)

OWN = (ssf_lib.SCALE, ssf_lib.SHIFT)


def randomize_own(params, seed=1):
    """Scales in [0.5, 1.5], shifts in [-0.5, 0.5]: far from the identity."""
    rng = np.random.default_rng(seed)
    def draw(path, x):
        if path.endswith(ssf_lib.SCALE):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
        if path.endswith(ssf_lib.SHIFT):
            return jnp.asarray(rng.uniform(-0.5, 0.5, x.shape), jnp.float32)
        return x
    return tree.map_with_path(draw, params)


def sites_leaf(path):
    return path.rpartition("/")[2]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, random_tree(model.param_shapes())


def test_shapes_axes_and_what_trains():
    model = tiny_model("classifier")
    method = SSF(also_train=(r"classifier/.*",))
    init_shapes = jax.eval_shape(method.init, jax.random.key(0), model.param_shapes())
    flat = tree.flatten(init_shapes)
    expected = {"attn/query": (4, 8), "attn/key": (4, 8), "attn/value": (4, 8),
                "attn/out": (32,), "attn_norm": (32,), "mlp/wi": (64,), "mlp/wo": (32,),
                "mlp_norm": (32,)}
    added = {p for p in flat if sites_leaf(p) in OWN}
    assert added == {f"encoder/layer_{i}/{m}/{leaf}" for i in (0, 1) for m in expected
                     for leaf in OWN}
    for module, shape in expected.items():
        for leaf in OWN:
            assert flat[f"encoder/layer_1/{module}/{leaf}"].shape == shape, module

    logical = tree.flatten(method.logical_axes(loop.abstract_params(model)[1], init_shapes))
    assert tuple(logical["encoder/layer_0/attn/key/ssf_scale"]) == ("kv_heads", "head_dim")
    assert tuple(logical["encoder/layer_0/mlp/wi/ssf_shift"]) == ("mlp",)
    assert tuple(logical["encoder/layer_0/mlp_norm/ssf_scale"]) == ("embed",)

    mask = tree.flatten(optim.trainable_mask(init_shapes, (), method.trainable))
    assert {p for p, t in mask.items() if t} == added | {"classifier/kernel", "classifier/bias"}
    assert isinstance(methods.build(dict(name="ssf")), SSF)
    ruled = SSF(targets=[[r".*/layer_1/.*", False], r"encoder/.*_norm"])
    assert list(ruled.plan(model.param_shapes())) == ["encoder/layer_0/attn_norm",
                                                      "encoder/layer_0/mlp_norm"]


def test_fresh_scales_and_shifts_leave_outputs_unchanged(tiny):
    model, params = tiny
    adapted = SSF().init(jax.random.key(0), params)
    flat = tree.flatten(adapted)
    assert all(np.all(np.asarray(v) == (p.endswith(ssf_lib.SCALE)))
               for p, v in flat.items() if sites_leaf(p) in OWN)
    ids, mask, types = token_batch()
    for x, y in zip(forward(model, None, params, ids, mask, types),
                    forward(model, SSF(), adapted, ids, mask, types)):
        assert gap(x, y) < 1e-6
    # The released code's init: N(1, 0.02) and N(0, 0.02).
    drawn = tree.flatten(SSF(init_std=0.02).init(jax.random.key(0), params))
    scales = np.concatenate([np.ravel(v) for p, v in drawn.items() if p.endswith("ssf_scale")])
    shifts = np.concatenate([np.ravel(v) for p, v in drawn.items() if p.endswith("ssf_shift")])
    assert abs(scales.mean() - 1) < 0.005 and 0.015 < scales.std() < 0.025
    assert abs(shifts.mean()) < 0.005 and 0.015 < shifts.std() < 0.025


class LinearNormLinear(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(5, name="wi")(x))
        return nn.Dense(3, name="wo")(nn.LayerNorm(epsilon=1e-6, name="norm")(h))


def test_layers_and_a_norm_against_numpy():
    """After each operation, bias included: ``γ⊙(x·W + b) + β`` and ``γ⊙LN(h) + β``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    module = LinearNormLinear()
    params = random_tree(jax.eval_shape(module.init, jax.random.key(0), x)["params"], 2, 1.0)
    method = SSF(targets=(r"wi", r"norm", r"wo"))
    adapted = randomize_own(method.init(None, params))
    f = {p: np.asarray(v, np.float64) for p, v in tree.flatten(adapted).items()}
    hidden = np.maximum((x @ f["wi/kernel"] + f["wi/bias"]) * f["wi/ssf_scale"]
                        + f["wi/ssf_shift"], 0)
    centred = hidden - hidden.mean(-1, keepdims=True)
    normed = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6)
    normed = (normed * f["norm/scale"] + f["norm/bias"]) * f["norm/ssf_scale"] + f[
        "norm/ssf_shift"]
    want = (normed @ f["wo/kernel"] + f["wo/bias"]) * f["wo/ssf_scale"] + f["wo/ssf_shift"]
    ours = method.apply(module, {"params": adapted}, x).outputs
    assert gap(ours, want) < 1e-5
    exported = method.export(adapted)
    assert set(tree.flatten(exported)) == set(tree.flatten(params))
    assert gap(module.apply({"params": exported}, x), want) < 1e-5


def test_export_folds_into_the_plain_model(tiny):
    """BERT (every block linear and norm, the embeddings' norm) and a ViT (its patch
    convolution and final norm too): folded equals unfolded."""
    model, params = tiny
    ids, mask, types = token_batch()
    method = SSF(targets=(*ssf_lib.DEFAULT_TARGETS, r"embeddings/norm"))
    adapted = randomize_own(method.init(None, params))
    ours = forward(model, method, adapted, ids, mask, types)
    exported = method.export(adapted)
    tree.check_same_structure(exported, params)
    plain = forward(model, None, exported, ids, mask, types)
    assert gap(ours[0], plain[0]) < 1e-5 and gap(ours[1], plain[1]) < 1e-5
    assert gap(ours[0], forward(model, None, params, ids, mask, types)[0]) > 1e-2
    scanned = tiny_model(scan_layers=True)
    assert gap(forward(scanned, method, adapted, ids, mask, types)[0], ours[0]) < 1e-5

    vit = models.build("vit_tiny_classifier")
    vit_params = random_tree(vit.param_shapes(), 4)
    method = SSF(targets=(*ssf_lib.DEFAULT_TARGETS, r"embeddings/patch", r"encoder/final_norm"))
    adapted = randomize_own(method.init(None, vit_params), 5)
    assert tree.flatten(adapted)["embeddings/patch/ssf_scale"].shape == (64,)
    images = np.random.default_rng(6).uniform(size=(2, 28, 28, 1)).astype(np.float32)
    ours = forward(vit, method, adapted, images)
    exported = method.export(adapted)
    tree.check_same_structure(exported, vit_params)
    assert gap(forward(vit, None, exported, images), ours) < 1e-4
    assert gap(forward(vit, None, vit_params, images), ours) > 1e-2


def test_training_under_the_loop_moves_only_the_scales_and_shifts():
    # layer_0 is the last (only) block: it computes [CLS] alone, every module still runs.
    setup, state = loop_setup(loop_config(dict(
        name="ssf", targets=(r"encoder/layer_0/(attn/(key|out)|mlp_norm)",),
        also_train=(r"classifier/.*",))))
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    assert set(trainable) == {f"encoder/layer_0/{m}/{leaf}" for m in ("attn/key", "attn/out",
                                                                       "mlp_norm")
                              for leaf in OWN} | {"classifier/kernel", "classifier/bias"}
    batch = random_batch(setup)
    state, _ = loop.make_train_step(setup)(state, batch)
    assert_only_trainable_moved(before, jax.device_get(state))


def test_config_file_builds_an_ssf_method():
    from configs import minilm_ssf

    config = minilm_ssf.get_config("quick")
    method = methods.build(config.method)
    assert isinstance(method, SSF) and config.train.steps == 4
    plan = method.plan(models.build("minilm_l6_classifier", num_classes=2).param_shapes())
    # Six linear layers and two norms per block, and the embeddings' norm.
    assert len(plan) == 8 * 6 + 1 and "embeddings/norm" in plan


def test_bad_input_is_a_one_line_error(tiny):
    _, params = tiny
    with pytest.raises(ValueError, match=r"SSF target rule 'encoder/.\*/mlp/woo' matches no "
                                         r"parameter; closest: encoder/") as info:
        SSF(targets=(r"encoder/.*/mlp/woo",)).plan(params)
    one_line(info)
    llama = models.build("llama_tiny_lm", num_layers=1)
    with pytest.raises(ValueError, match=r"SSF target decoder/layer_0/attn/key has no bias, so "
                                         r"its shift could not fold into the plain model") as info:
        SSF().plan(llama.param_shapes())
    one_line(info)
    with pytest.raises(ValueError, match=r"config.method.init_std=-0.1 is not a number >= 0"):
        SSF(init_std=-0.1)
    with pytest.raises(ValueError, match=r"SSF target rule 3 is neither a regex nor"):
        SSF(targets=(3,))
    with pytest.raises(ValueError, match=r"SSF target rules are empty"):
        SSF(targets=())
    with pytest.raises(ValueError, match="config.method for 'ssf'.*rank"):
        methods.build(dict(name="ssf", rank=4))
