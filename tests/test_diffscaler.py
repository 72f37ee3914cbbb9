"""Diffscaler on a tiny ViT: Affiner shapes, axes and what trains; a fresh Affiner changes
nothing; a Dense pair and the multi-axis attention output against numpy (``(1 + a)⊙(x·W) + b̂ +
b + s·relu(x·D)·U``: the frozen bias is not scaled); export folds the scale and shift into the
plain model exactly (folded equals unfolded without the branch) and keeps the branch;
training moves only the Affiners; bad input is a one-line error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import methods, models, tree
from research.adapters import diffscaler as diffscaler_lib
from research.adapters.diffscaler import Diffscaler
from research.models.layers import MultiAxisDense
from research.train import loop, optim
from tests.tiny_bert import forward, gap, one_line, assert_only_trainable_moved

KEY = diffscaler_lib.KEY


def vit_model(**overrides):
    return models.build("vit_tiny_classifier", **overrides)


def random_tree(shapes, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32),
                        shapes)


def randomize_own(params, seed=1):
    """Scales in [0.5, 1.5], shifts and branch factors N(0, 0.3): far from the identity."""
    rng = np.random.default_rng(seed)
    def draw(path, x):
        if path.endswith(f"{KEY}/scale"):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
        if f"/{KEY}/" in f"/{path}":
            return jnp.asarray(rng.normal(0.0, 0.3, x.shape), jnp.float32)
        return x
    return tree.map_with_path(draw, params)


def images(rows=3, seed=0):
    return np.random.default_rng(seed).uniform(size=(rows, 28, 28, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def vit():
    model = vit_model()
    return model, random_tree(model.param_shapes())


def test_shapes_axes_and_what_trains():
    model = vit_model()
    method = Diffscaler(rank=4, also_train=(r"classifier/.*",))
    init_shapes = jax.eval_shape(method.init, jax.random.key(0), model.param_shapes())
    flat = tree.flatten(init_shapes)
    # hidden 64, 4 heads of 16, MLP 128: (scale/shift, down, up) per linear layer of a block.
    expected = {"attn/query": ((4, 16), (64, 4), (4, 4, 16)),
                "attn/value": ((4, 16), (64, 4), (4, 4, 16)),
                "attn/out": ((64,), (4, 16, 4), (4, 64)),
                "mlp/wi": ((128,), (64, 4), (4, 128)),
                "mlp/wo": ((64,), (128, 4), (4, 64))}
    for module, (affine, down, up) in expected.items():
        prefix = f"encoder/layer_1/{module}/{KEY}"
        assert flat[f"{prefix}/scale"].shape == flat[f"{prefix}/shift"].shape == affine
        assert flat[f"{prefix}/down"].shape == down and flat[f"{prefix}/up"].shape == up
    added = {p for p in flat if f"/{KEY}/" in p}
    assert len(added) == 2 * 6 * 4

    logical = tree.flatten(method.logical_axes(loop.abstract_params(model)[1], init_shapes))
    assert tuple(logical[f"encoder/layer_0/attn/key/{KEY}/scale"]) == ("kv_heads", "head_dim")
    assert tuple(logical[f"encoder/layer_0/attn/out/{KEY}/down"]) == ("heads", "head_dim", None)
    assert tuple(logical[f"encoder/layer_0/mlp/wi/{KEY}/up"]) == (None, "mlp")

    mask = tree.flatten(optim.trainable_mask(init_shapes, (), method.trainable))
    assert {p for p, t in mask.items() if t} == added | {"classifier/kernel", "classifier/bias"}
    built = methods.build(dict(name="diffscaler", rank=0))
    assert isinstance(built, Diffscaler)
    assert not any(p.endswith(("down", "up")) for p in tree.flatten(
        jax.eval_shape(built.init, jax.random.key(0), model.param_shapes())))
    ruled = Diffscaler(targets=[[r".*/layer_0/.*", False], r"encoder/.*/mlp/wo"])
    assert list(ruled.plan(model.param_shapes())) == ["encoder/layer_1/mlp/wo"]


def test_fresh_affiners_leave_outputs_unchanged(vit):
    model, params = vit
    method = Diffscaler()
    adapted = method.init(jax.random.key(0), params)
    flat = tree.flatten(adapted)
    down = flat[f"encoder/layer_0/mlp/wi/{KEY}/down"]
    assert 0 < np.abs(down).max() <= 1 / np.sqrt(64)  # torch's linear init over fan_in 64
    assert np.all(np.asarray(flat[f"encoder/layer_0/mlp/wi/{KEY}/up"]) == 0)
    x = images()
    plain = forward(model, None, params, x)
    assert gap(forward(model, method, adapted, x), plain) < 1e-6
    moved = randomize_own(adapted)
    assert gap(forward(model, method, moved, x), plain) > 1e-2


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="wo")(jax.nn.gelu(nn.Dense(5, name="wi")(x)))


def affiner(x, f, layer, contract=1, s=1.0):
    """numpy: ``(1 + a)⊙(x·W) + b̂ + b + s·relu(x·D)·U`` with ``contract`` input axes."""
    own = f"{layer}/{KEY}"
    linear = np.tensordot(x, f[f"{layer}/kernel"], contract)
    branch = np.tensordot(np.maximum(np.tensordot(x, f[f"{own}/down"], contract), 0),
                          f[f"{own}/up"], 1)
    return (f[f"{own}/scale"] * linear + f[f"{layer}/bias"] + f[f"{own}/shift"]
            + s * branch)


def test_dense_layers_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    module = TwoDense()
    params = random_tree(jax.eval_shape(module.init, jax.random.key(0), x)["params"], 2, 1.0)
    method = Diffscaler(targets=(r"w(i|o)",), rank=2, subspace_scale=0.5)
    adapted = randomize_own(method.init(jax.random.key(1), params))
    f = {p: np.asarray(v, np.float64) for p, v in tree.flatten(adapted).items()}
    hidden = np.asarray(jax.nn.gelu(affiner(x, f, "wi", s=0.5)), np.float64)
    want = affiner(hidden, f, "wo", s=0.5)
    assert gap(method.apply(module, {"params": adapted}, x).outputs, want) < 1e-5


def test_attention_output_against_numpy():
    """The multi-axis attention output: the branch contracts both input axes (heads, head_dim)."""
    config = vit_model().config
    layer = MultiAxisDense(config, ("heads", "head_dim", "embed"), (64,), "...hd,hde->...e")
    context = np.random.default_rng(3).normal(size=(2, 5, 4, 16)).astype(np.float32)
    params = random_tree(nn.unbox(jax.eval_shape(layer.init, jax.random.key(0),
                                                 context))["params"], 4)
    method = Diffscaler(targets=(r"",), rank=3)
    adapted = randomize_own(method.init(jax.random.key(1), params), 5)  # the root layer
    f = {f"out/{p}": np.asarray(v, np.float64) for p, v in tree.flatten(adapted).items()}
    want = affiner(context, f, "out", contract=2)
    ours = method.apply(layer, {"params": adapted}, context).outputs
    assert gap(ours, want) < 1e-5


def test_export_folds_the_affine_part_and_keeps_the_branch(vit):
    model, params = vit
    x = images()
    # rank 0: the whole method folds; the plain ViT computes it.
    method = Diffscaler(rank=0)
    adapted = randomize_own(method.init(None, params))
    ours = forward(model, method, adapted, x)
    exported = method.export(adapted)
    tree.check_same_structure(exported, params)
    assert gap(forward(model, None, exported, x), ours) < 1e-5
    assert gap(forward(model, None, params, x), ours) > 1e-2

    # rank > 0: scale and shift fold, the branch stays and the method still runs it.
    method = Diffscaler(rank=4)
    adapted = randomize_own(method.init(jax.random.key(0), params))
    ours = forward(model, method, adapted, x)
    exported = method.export(adapted)
    extra = set(tree.flatten(exported)) - set(tree.flatten(params))
    assert extra and all(p.endswith((f"{KEY}/down", f"{KEY}/up")) for p in extra)
    assert gap(forward(model, method, exported, x), ours) < 1e-5
    without_branch = tree.map_with_path(
        lambda p, v: jnp.zeros_like(v) if p.endswith(f"{KEY}/up") else v, adapted)
    assert gap(forward(model, None, exported, x),
               forward(model, method, without_branch, x)) < 1e-5
    scanned = vit_model(scan_layers=True)
    assert gap(forward(scanned, method, adapted, x), ours) < 1e-5


def test_training_under_the_loop_moves_only_the_affiners():
    from configs import common

    config = common.base_config()
    config.data.name = "mnist5k"
    config.model.name = "vit_tiny_classifier"
    config.model.overrides = dict(num_layers=1)
    config.train.batch_size = 8
    config.optim.learning_rate = 1e-2
    config.optim.schedule = "constant"
    config.mesh = dict(data=1)
    config.method = dict(name="diffscaler", rank=2,
                         targets=(r"encoder/layer_0/(attn/value|mlp/wi)",),
                         also_train=(r"classifier/.*",))
    setup = loop.make_setup(config, loop.build_model(config), 2, devices=jax.devices()[:1])
    state = loop.init_state(config, setup)
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    assert set(trainable) == {f"encoder/layer_0/{m}/{KEY}/{leaf}"
                              for m in ("attn/value", "mlp/wi")
                              for leaf in ("scale", "shift", "down", "up")} | {
                                  "classifier/kernel", "classifier/bias"}
    rng = np.random.default_rng(0)
    batch = loop.global_batch(setup, {"image": images(8),
                                      "label": rng.integers(0, 10, (8,)).astype(np.int32)})
    step = loop.make_train_step(setup)
    # Two steps: with ``up`` at zero the first one moves ``up`` only, the second ``down`` too.
    state, _ = step(state, batch)
    state, _ = step(state, batch)
    assert_only_trainable_moved(before, jax.device_get(state))


def test_config_file_builds_a_diffscaler_method():
    from configs import vit_mnist5k_diffscaler

    config = vit_mnist5k_diffscaler.get_config("quick")
    method = methods.build(config.method)
    assert isinstance(method, Diffscaler) and config.train.steps == 4
    assert config.model.init_from == ""  # the smoke test needs no earlier run
    assert vit_mnist5k_diffscaler.get_config().model.init_from == "runs/vit_mnist5k"
    plan = method.plan(models.build(config.model.name).param_shapes())
    assert len(plan) == 6 * 2


def test_bad_input_is_a_one_line_error(vit):
    model, params = vit
    with pytest.raises(ValueError, match=r"Diffscaler target rule 'encoder/.\*/mlp/woo' "
                                         r"matches no parameter; closest: encoder/") as info:
        Diffscaler(targets=(r"encoder/.*/mlp/woo",)).plan(params)
    one_line(info)
    llama = models.build("llama_tiny_lm", num_layers=1)
    with pytest.raises(ValueError, match=r"Diffscaler target decoder/layer_0/attn/key has no "
                                         r"bias, so its shift could not fold") as info:
        Diffscaler().plan(llama.param_shapes())
    one_line(info)
    # The patch convolution's scale and shift fold, but its input is an image: no branch.
    patch = Diffscaler(targets=(r"embeddings/patch",), rank=0)
    adapted = randomize_own(patch.init(None, params))
    x = images()
    assert gap(forward(model, None, patch.export(adapted), x),
               forward(model, patch, adapted, x)) < 1e-5
    branched = Diffscaler(targets=(r"embeddings/patch",), rank=2)
    with pytest.raises(ValueError, match=r"embeddings/patch sit in a Conv; they adapt nn.Dense, "
                                         r"MultiAxisDense and nn.Embed") as info:
        branched.apply(model.module, {"params": branched.init(jax.random.key(0), params)}, x)
    one_line(info)
    with pytest.raises(ValueError, match=r"config.method.rank=-1 is not an integer >= 0"):
        Diffscaler(rank=-1)
    with pytest.raises(ValueError, match=r"config.method.subspace_scale='big' is not a "
                                         r"number >= 0"):
        Diffscaler(subspace_scale="big")
    with pytest.raises(ValueError, match="config.method for 'diffscaler'.*alpha"):
        methods.build(dict(name="diffscaler", alpha=4))
