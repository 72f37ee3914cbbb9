"""VeRA as a tree transform: shared matrices and vector shapes, axes and what trains; the
kaiming-uniform draw from the projection key; fresh vectors change nothing; one layer against a
numpy reference; export folds the update into the plain model; a scanned stack computes the
same; training moves only the vectors; PEFT adapters match ``peft`` in PyTorch both ways; bad
input is a one-line error."""

import dataclasses
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from research import methods, models, peft_format, tree  # noqa: E402
from research.lowrank import vera as vera_lib  # noqa: E402
from research.lowrank.vera import VeRA  # noqa: E402
from research.train import loop, optim  # noqa: E402
from tests.tiny_bert import (  # noqa: E402
    tiny_model, random_params, token_batch, forward, gap, one_line, loop_config, loop_setup,
    random_batch, assert_only_trainable_moved, save_torch_base, torch_bert_outputs
)

# Multi-axis outputs (query, value), a multi-axis input (attn/out), Dense both ways; the widest
# input is mlp/wo's 64, the widest output mlp/wi's 64.
WIDE = dict(targets=(r"encoder/.*/attn/(query|value|out)/kernel", r"encoder/.*/mlp/(wi|wo)/kernel"),
            rank=4)


def randomize_vectors(params, seed=1):
    """Non-trivial vectors: both scale every path, and lambda_b is no longer 0."""
    rng = np.random.default_rng(seed)
    return tree.map_with_path(
        lambda p, x: jnp.asarray(rng.uniform(-1.5, 1.5, x.shape), jnp.float32)
        if p.endswith(("vera_lambda_d", "vera_lambda_b")) else x, params)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, random_params(model)


def test_shapes_axes_and_what_trains():
    model = tiny_model("classifier")
    method = VeRA(**WIDE, also_train=(r"classifier/.*",))
    init_shapes = jax.eval_shape(method.init, jax.random.key(0), model.param_shapes())
    shapes = tree.flatten(init_shapes)
    assert shapes["vera/a"].shape == (64, 4) and shapes["vera/b"].shape == (4, 64)
    expected = {"encoder/layer_0/attn/query": (4, 8),   # output axes [heads, head_dim]
                "encoder/layer_1/attn/value": (4, 8),
                "encoder/layer_0/attn/out": (32,),
                "encoder/layer_0/mlp/wi": (64,),
                "encoder/layer_1/mlp/wo": (32,)}
    for module, shape in expected.items():
        assert shapes[f"{module}/vera_lambda_b"].shape == shape, module
        assert shapes[f"{module}/vera_lambda_d"].shape == (4,), module
    vectors = [p for p in shapes if "vera_lambda" in p]
    assert len(vectors) == 2 * 2 * 5 and "encoder/layer_0/attn/key/vera_lambda_b" not in shapes

    logical = tree.flatten(method.logical_axes(loop.abstract_params(model)[1], init_shapes))
    assert logical["encoder/layer_0/attn/query/vera_lambda_b"] == ("heads", "head_dim")
    assert logical["encoder/layer_0/attn/out/vera_lambda_b"] == ("embed",)
    assert logical["encoder/layer_0/mlp/wi/vera_lambda_b"] == ("mlp",)
    assert logical["encoder/layer_0/mlp/wi/vera_lambda_d"] == (None,)
    assert logical["vera/a"] == (None, None) and logical["vera/b"] == (None, None)

    mask = tree.flatten(optim.trainable_mask(tree.unflatten(shapes), (), method.trainable))
    assert {p for p, t in mask.items() if t} == set(vectors) | {"classifier/kernel",
                                                                  "classifier/bias"}
    default = methods.build(dict(name="vera"))
    assert isinstance(default, VeRA) and default.rank == 256 and default.d_initial == 0.1
    plan = default.plan(model.param_shapes())
    assert sorted(p.split("/", 2)[2] for p in plan if "layer_0" in p) == [
        "attn/query/kernel", "attn/value/kernel"]
    # Lists (from a config file) and (regex, bool) rules work; an exclusion can come first.
    ruled = VeRA(targets=[[r".*/layer_1/.*", False], r"encoder/.*/attn/key/kernel"])
    assert list(ruled.plan(model.param_shapes())) == ["encoder/layer_0/attn/key/kernel"]


def test_init_draws_shared_matrices_and_leaves_outputs_unchanged(tiny):
    model, params = tiny
    method = VeRA(**WIDE)
    adapted = method.init(jax.random.key(0), params)
    flat = tree.flatten(adapted)
    for path, value in flat.items():
        if path.endswith("vera_lambda_d"):
            np.testing.assert_allclose(value, 0.1, err_msg=path)
        elif path.endswith("vera_lambda_b"):
            assert np.all(np.asarray(value) == 0), path
    # Kaiming uniform as PEFT draws it: U(±sqrt(6 / fan_in)), fan_in = in_max for A, r for B.
    for path, bound in (("vera/a", math.sqrt(6 / 64)), ("vera/b", math.sqrt(6 / 4))):
        value = np.asarray(flat[path])
        assert np.abs(value).max() <= bound and np.abs(value).max() > 0.9 * bound, path
        assert abs(value.std() - bound / math.sqrt(3)) < 0.15 * bound, path
    # From the projection key alone: the same for any init rng, another for another key.
    again = tree.flatten(method.init(jax.random.key(7), params))
    np.testing.assert_array_equal(again["vera/a"], flat["vera/a"])
    other = tree.flatten(VeRA(**WIDE, projection_prng_key=1).init(None, params))
    assert gap(other["vera/a"], flat["vera/a"]) > 0.1

    ids, mask, types = token_batch()
    for x, y in zip(forward(model, None, params, ids, mask, types),
                    forward(model, method, adapted, ids, mask, types)):
        assert gap(x, y) < 1e-6


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="wo")(jax.nn.relu(nn.Dense(5, name="wi")(x)))


def test_one_layer_against_numpy():
    """Each layer slices the shared matrices to its own sizes: wi takes A[:6], B[:, :5]; wo
    takes A[:5], B[:, :3]."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32),
                          jax.eval_shape(TwoDense().init, jax.random.key(0), x)["params"])
    method = VeRA(targets=(r"w(i|o)/kernel",), rank=3)
    adapted = randomize_vectors(method.init(None, params))
    f = {p: np.asarray(v, np.float64) for p, v in tree.flatten(adapted).items()}
    assert f["vera/a"].shape == (6, 3) and f["vera/b"].shape == (3, 5)
    a, b = f["vera/a"], f["vera/b"]

    def layer(name, inputs):
        n_in, n_out = f[f"{name}/kernel"].shape
        update = ((inputs @ a[:n_in]) * f[f"{name}/vera_lambda_d"]) @ b[:, :n_out]
        return inputs @ f[f"{name}/kernel"] + f[f"{name}/bias"] + update * f[
            f"{name}/vera_lambda_b"]
    want = layer("wo", np.maximum(layer("wi", x), 0))
    ours = method.apply(TwoDense(), {"params": adapted}, x).outputs
    assert gap(ours, want) < 1e-5
    exported = method.export(adapted)
    assert set(tree.flatten(exported)) == set(tree.flatten(params))
    assert gap(TwoDense().apply({"params": exported}, x), want) < 1e-5


def test_export_folds_the_update_into_the_plain_model(tiny):
    model, params = tiny
    ids, mask, types = token_batch()
    method = VeRA(**WIDE)
    adapted = randomize_vectors(method.init(None, params))
    ours = forward(model, method, adapted, ids, mask, types)
    exported = method.export(adapted)
    tree.check_same_structure(exported, params)
    plain = forward(model, None, exported, ids, mask, types)
    assert gap(ours[0], plain[0]) < 1e-5 and gap(ours[1], plain[1]) < 1e-5
    assert gap(ours[0], forward(model, None, params, ids, mask, types)[0]) > 1e-2
    # Dropout acts on the path's input in training only (the model's own dropout is 0 here).
    dropped = dataclasses.replace(method, dropout=0.5)
    trained = jax.jit(lambda p: dropped.apply(
        model.module, {"params": p}, ids, mask, types, deterministic=False,
        rngs={"dropout": jax.random.key(0)}).outputs)(adapted)
    assert gap(trained[0], ours[0]) > 1e-2
    assert gap(forward(model, dropped, adapted, ids, mask, types)[0], ours[0]) < 1e-6


def test_a_scanned_stack_computes_the_same(tiny):
    model, params = tiny
    scanned = tiny_model(scan_layers=True)
    method = VeRA(**WIDE)
    assert method.scannable
    adapted = randomize_vectors(method.init(None, params), seed=3)
    ids, mask, types = token_batch(seed=3)
    want = forward(model, method, adapted, ids, mask, types)
    got = forward(scanned, method, adapted, ids, mask, types)
    assert gap(want[0], got[0]) < 1e-5 and gap(want[1], got[1]) < 1e-5


def test_training_under_the_loop_moves_only_the_vectors():
    setup, state = loop_setup(loop_config(dict(name="vera", rank=4,
                                               also_train=(r"classifier/.*",))))
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    assert set(trainable) == {f"encoder/layer_0/attn/{m}/vera_lambda_{v}"
                              for m in ("query", "value") for v in "bd"} | {
        "classifier/kernel", "classifier/bias"}
    assert {"vera/a", "vera/b"} <= set(tree.flatten(before["frozen"]))
    batch = random_batch(setup)
    step = loop.make_train_step(setup)
    # lambda_b starts at 0, so lambda_d gets its first gradient on the second step.
    for _ in range(2):
        state, _ = step(state, batch)
    assert_only_trainable_moved(before, jax.device_get(state))


def test_config_file_builds_a_vera_method():
    from configs import minilm_vera

    config = minilm_vera.get_config("quick")
    method = methods.build(config.method)
    assert isinstance(method, VeRA) and config.train.steps == 4 and method.rank == 256
    shapes = models.build("minilm_l6_classifier", num_classes=2).param_shapes()
    plan = method.plan(shapes)
    assert len(plan) == 2 * 6
    assert vera_lib.shared_shapes(plan, method.rank) == ((384, 256), (256, 384))


def test_bad_input_is_a_one_line_error(tiny, tmp_path):
    model, params = tiny
    with pytest.raises(ValueError, match=r"VeRA target rule 'encoder/.*/kernal' matches no "
                                         r"parameter; closest: encoder/") as info:
        VeRA(targets=(r"encoder/.*/kernal",)).plan(params)
    one_line(info)
    with pytest.raises(ValueError, match=r"config.method.rank=0 is not a positive integer"):
        VeRA(rank=0)
    with pytest.raises(ValueError, match="config.method for 'vera'.*alpha"):
        methods.build(dict(name="vera", alpha=4))

    # Shared matrices already in the tree: of a smaller rank, or narrower than a target.
    adapted = VeRA(targets=(r".*/attn/query/kernel",), rank=4).init(None, params)
    with pytest.raises(ValueError, match=r"config.method.rank=8 does not match the shared "
                                         r"matrices' rank 4 \(vera/a \(32, 4\), vera/b "
                                         r"\(4, 32\)\)") as info:
        VeRA(targets=(r".*/attn/query/kernel",), rank=8).init(None, adapted)
    one_line(info)
    with pytest.raises(ValueError, match=r"VeRA target encoder/layer_0/mlp/wi/kernel \(32, 64\) "
                                         r"has 32 inputs and 64 outputs; the shared matrices "
                                         r"cover 32 \(vera/a \(32, 4\)\) and 32") as info:
        VeRA(targets=(r".*/attn/query/kernel", r".*/mlp/wi/kernel"), rank=4).init(None, adapted)
    one_line(info)

    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere/adapter_config.json does not exist"):
        vera_lib.import_vera_peft(missing, model, params)
    method = VeRA(**WIDE)
    vera_lib.export_vera_peft(method, method.init(None, params), model, str(tmp_path / "b"))
    config_path = tmp_path / "b" / peft_format.ADAPTER_CONFIG
    config = json.load(open(config_path))
    json.dump({**config, "peft_type": "LORA"}, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"b/adapter_config.json: peft_type='LORA'; only 'VERA' "
                                         r"adapters import here") as info:
        vera_lib.import_vera_peft(str(tmp_path / "b"), model, params)
    one_line(info)
    json.dump({**config, "r": 8}, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: base_model.vera_A "
                                         r"\(4, 64\) has rank 4; its adapter_config.json says "
                                         r"r=8") as info:
        vera_lib.import_vera_peft(str(tmp_path / "b"), model, params)
    one_line(info)
    json.dump({**config, "save_projection": False}, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"save_projection=False leaves the shared matrices to "
                                         r"torch's PRNG") as info:
        vera_lib.import_vera_peft(str(tmp_path / "b"), model, params)
    one_line(info)
    json.dump(config, open(config_path, "w"))

    wider = tiny_model(mlp_dim=96)
    with pytest.raises(ValueError, match=r"base_model.vera_A \(4, 64\) and base_model.vera_B "
                                         r"\(64, 4\) cover 64 inputs and 64 outputs; this "
                                         r"model's encoder/layer_0/mlp/wi/kernel \(32, 96\) has "
                                         r"32 and 96") as info:
        vera_lib.import_vera_peft(str(tmp_path / "b"), wider, random_params(wider))
    one_line(info)


# ---------------------------------------------------------------------------------------------
# PEFT interop, against peft in PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_side(tmp_path_factory, tiny):
    return save_torch_base(tmp_path_factory, *tiny, "peft_vera")


def test_exported_adapter_matches_peft_in_torch(tiny, torch_side, tmp_path):
    import peft
    import transformers

    model, params = tiny
    method = VeRA(**WIDE, also_train=(r"pooler/.*",))
    adapted = randomize_vectors(method.init(None, params))
    adapted = tree.map_with_path(lambda p, x: x + 0.5 if p.startswith("pooler/") else x, adapted)
    config = vera_lib.export_vera_peft(method, adapted, model, str(tmp_path / "adapter"),
                                       base_model_name_or_path=torch_side)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    saved = json.load(open(tmp_path / "adapter" / peft_format.ADAPTER_CONFIG))
    assert saved == config and saved["peft_type"] == "VERA" and saved["r"] == 4
    assert saved["modules_to_save"] == ["pooler.dense"]
    # "dense" would also pick the pooler, so the targets go by their full names.
    assert len(saved["target_modules"]) == 10
    assert "encoder.layer.1.attention.output.dense" in saved["target_modules"]
    base = transformers.BertModel.from_pretrained(torch_side)
    torch_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(torch_model.base_model.vera_A["default"].numpy(),
                               np.asarray(adapted["vera"]["a"]).T)
    ids, mask, types = token_batch()
    theirs = torch_bert_outputs(torch_model, ids, mask, types)
    ours = forward(model, method, adapted, ids, mask, types)
    assert gap(ours[0], theirs[0]) < 1e-4 and gap(ours[1], theirs[1]) < 1e-4

    # ...and it reads back into the same tree and the same function.
    again_method, again = vera_lib.import_vera_peft(str(tmp_path / "adapter"), model, params)
    assert set(tree.flatten(again)) == set(tree.flatten(adapted))
    for path, value in tree.flatten(adapted).items():
        np.testing.assert_allclose(tree.flatten(again)[path], value, atol=1e-7, err_msg=path)
    assert set(again_method.plan(again)) == set(method.plan(adapted))
    assert again_method.trainable == (vera_lib.VECTOR_PATTERN, "pooler/bias", "pooler/kernel")


def test_peft_created_adapter_imports(tiny, torch_side, tmp_path):
    import peft
    import torch
    import transformers

    model, params = tiny
    torch.manual_seed(0)
    base = transformers.BertModel.from_pretrained(torch_side)
    # init_weights=False: lambda_b = 1 and lambda_d ~ N(0, 1), so every path shows; the
    # shared matrices come from torch's own draw (projection_prng_key=3).
    torch_model = peft.get_peft_model(base, peft.VeraConfig(
        r=6, target_modules=["key", "value", "intermediate.dense", "output.dense"],
        projection_prng_key=3, init_weights=False)).eval()
    with torch.no_grad():
        for name, param in torch_model.named_parameters():
            if "vera_lambda_b" in name:
                param.uniform_(-1.5, 1.5)
    torch_model.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, types = token_batch(seed=1)
    theirs = torch_bert_outputs(torch_model, ids, mask, types)

    method, adapted = vera_lib.import_vera_peft(str(tmp_path / "adapter"), model, params)
    assert method.rank == 6 and method.projection_prng_key == 3
    flat = tree.flatten(adapted)
    assert flat["vera/a"].shape == (64, 6) and flat["vera/b"].shape == (6, 64)
    plan = method.plan(adapted)
    assert {"encoder/layer_1/attn/out/kernel", "encoder/layer_1/mlp/wo/kernel",
            "encoder/layer_1/mlp/wi/kernel", "encoder/layer_0/attn/key/kernel"} <= set(plan)
    assert "encoder/layer_0/attn/query/kernel" not in plan
    ours = forward(model, method, adapted, ids, mask, types)
    assert gap(ours[0], theirs[0]) < 1e-4 and gap(ours[1], theirs[1]) < 1e-4
    # The folded export is the same function as well.
    plain = forward(model, None, method.export(adapted), ids, mask, types)
    assert gap(plain[0], theirs[0]) < 1e-4
