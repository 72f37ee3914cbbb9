"""IA³ as a tree transform: vector shapes, axes and what trains; fresh vectors change nothing;
one layer against a numpy reference (output scaling includes the bias, feedforward scales the
input); export folds the vectors into the plain model; training moves only the vectors; PEFT
adapters match ``peft`` in PyTorch both ways; bad input is a one-line error."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from research import methods, models, peft_format, tree  # noqa: E402
from research.adapters import ia3 as ia3_lib  # noqa: E402
from research.adapters.ia3 import IA3  # noqa: E402
from research.train import loop, optim  # noqa: E402
from tests.tiny_bert import (  # noqa: E402
    tiny_model, random_params, token_batch, forward, gap, one_line, loop_config, loop_setup,
    random_batch, assert_only_trainable_moved, save_torch_base, torch_bert_outputs
)

# Multi-axis outputs (key, value), a multi-axis feedforward input (attn/out), Dense both ways.
WIDE = dict(targets=(r"encoder/.*/attn/(key|value|out)/kernel", r"encoder/.*/mlp/(wi|wo)/kernel"),
            feedforward=(r".*/attn/out/kernel", r".*/mlp/wo/kernel"))


def randomize_vectors(params, seed=1):
    rng = np.random.default_rng(seed)
    return tree.map_with_path(
        lambda p, x: jnp.asarray(rng.uniform(0.3, 1.7, x.shape), jnp.float32)
        if p.endswith(ia3_lib.L) else x, params)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, random_params(model)


def test_vector_shapes_axes_and_what_trains():
    model = tiny_model("classifier")
    method = IA3(**WIDE, also_train=(r"classifier/.*",))
    init_shapes = jax.eval_shape(method.init, jax.random.key(0), model.param_shapes())
    shapes = tree.flatten(init_shapes)
    expected = {"encoder/layer_0/attn/key": (4, 8),     # output axes [heads, head_dim]
                "encoder/layer_1/attn/value": (4, 8),
                "encoder/layer_0/attn/out": (4, 8),     # feedforward: input axes
                "encoder/layer_0/mlp/wi": (64,),        # output
                "encoder/layer_1/mlp/wo": (64,)}        # feedforward: input
    for module, shape in expected.items():
        assert shapes[f"{module}/ia3_l"].shape == shape, module
    added = [p for p in shapes if p.endswith("ia3_l")]
    assert len(added) == 2 * 5 and "encoder/layer_0/attn/query/ia3_l" not in shapes

    logical = tree.flatten(method.logical_axes(loop.abstract_params(model)[1], init_shapes))
    assert logical["encoder/layer_0/attn/key/ia3_l"] == ("kv_heads", "head_dim")
    assert logical["encoder/layer_0/attn/out/ia3_l"] == ("heads", "head_dim")
    assert logical["encoder/layer_0/mlp/wo/ia3_l"] == ("mlp",)
    assert logical["encoder/layer_0/mlp/wi/ia3_l"] == ("mlp",)

    mask = tree.flatten(optim.trainable_mask(tree.unflatten(shapes), (), method.trainable))
    assert {p for p, t in mask.items() if t} == set(added) | {"classifier/kernel",
                                                                "classifier/bias"}
    default = methods.build(dict(name="ia3"))
    assert isinstance(default, IA3)
    plan = default.plan(model.param_shapes())
    assert sorted(p.split("/", 2)[2] for p in plan if "layer_0" in p) == [
        "attn/key/kernel", "attn/value/kernel", "mlp/wo/kernel"]
    assert [p for p, t in plan.items() if t.feedforward] == [
        "encoder/layer_0/mlp/wo/kernel", "encoder/layer_1/mlp/wo/kernel"]
    # Lists (from a config file) and (regex, bool) rules work; an exclusion can come first.
    ruled = IA3(targets=[[r".*/layer_1/.*", False], r"encoder/.*/attn/key/kernel"])
    assert list(ruled.plan(model.param_shapes())) == ["encoder/layer_0/attn/key/kernel"]


def test_fresh_vectors_leave_outputs_unchanged(tiny):
    model, params = tiny
    method = IA3(**WIDE)
    adapted = method.init(jax.random.key(0), params)
    assert all(np.all(np.asarray(v) == 1) for p, v in tree.flatten(adapted).items()
               if p.endswith("ia3_l"))
    ids, mask, types = token_batch()
    for x, y in zip(forward(model, None, params, ids, mask, types),
                    forward(model, method, adapted, ids, mask, types)):
        assert gap(x, y) < 1e-6


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="wo")(jax.nn.relu(nn.Dense(5, name="wi")(x)))


def test_one_layer_against_numpy():
    """``wi`` scaled on its output (bias included), ``wo`` on its input (bias not)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32),
                          jax.eval_shape(TwoDense().init, jax.random.key(0), x)["params"])
    method = IA3(targets=(r"w(i|o)/kernel",), feedforward=(r"wo/kernel",))
    adapted = randomize_vectors(method.init(None, params))
    f = {p: np.asarray(v, np.float64) for p, v in tree.flatten(adapted).items()}
    assert f["wi/ia3_l"].shape == (5,) and f["wo/ia3_l"].shape == (5,)
    hidden = np.maximum((x @ f["wi/kernel"] + f["wi/bias"]) * f["wi/ia3_l"], 0)
    want = (hidden * f["wo/ia3_l"]) @ f["wo/kernel"] + f["wo/bias"]
    ours = method.apply(TwoDense(), {"params": adapted}, x).outputs
    assert gap(ours, want) < 1e-5
    exported = method.export(adapted)
    assert set(tree.flatten(exported)) == set(tree.flatten(params))
    assert gap(TwoDense().apply({"params": exported}, x), want) < 1e-5


def test_export_folds_the_vectors_into_the_plain_model(tiny):
    model, params = tiny
    ids, mask, types = token_batch()
    method = IA3(**WIDE)
    adapted = randomize_vectors(method.init(None, params))
    ours = forward(model, method, adapted, ids, mask, types)
    exported = method.export(adapted)
    tree.check_same_structure(exported, params)
    plain = forward(model, None, exported, ids, mask, types)
    assert gap(ours[0], plain[0]) < 1e-5 and gap(ours[1], plain[1]) < 1e-5
    assert gap(ours[0], forward(model, None, params, ids, mask, types)[0]) > 1e-2


def test_training_under_the_loop_moves_only_the_vectors():
    setup, state = loop_setup(loop_config(dict(name="ia3", also_train=(r"classifier/.*",))))
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    assert set(trainable) == {"encoder/layer_0/attn/key/ia3_l", "encoder/layer_0/attn/value/ia3_l",
                              "encoder/layer_0/mlp/wo/ia3_l", "classifier/kernel",
                              "classifier/bias"}
    batch = random_batch(setup)
    state, _ = loop.make_train_step(setup)(state, batch)
    assert_only_trainable_moved(before, jax.device_get(state))


def test_config_file_builds_an_ia3_method():
    from configs import minilm_ia3

    config = minilm_ia3.get_config("quick")
    method = methods.build(config.method)
    assert isinstance(method, IA3) and config.train.steps == 4
    shapes = models.build("minilm_l6_classifier", num_classes=2).param_shapes()
    plan = method.plan(shapes)
    assert len(plan) == 3 * 6 and sum(t.feedforward for t in plan.values()) == 6


def test_bad_input_is_a_one_line_error(tiny, tmp_path):
    model, params = tiny
    with pytest.raises(ValueError, match=r"IA3 target rule 'encoder/.*/kernal' matches no "
                                         r"parameter; closest: encoder/") as info:
        IA3(targets=(r"encoder/.*/kernal",)).plan(params)
    one_line(info)
    with pytest.raises(ValueError, match=r"IA3 feedforward rule '.*/mlp/wi/kernel' matches no "
                                         r"target; feedforward layers must be among the "
                                         r"targets, closest: encoder/") as info:
        IA3(feedforward=(r".*/mlp/wi/kernel",)).plan(params)
    one_line(info)
    with pytest.raises(ValueError, match="config.method for 'ia3'.*rank"):
        methods.build(dict(name="ia3", rank=4))

    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere/adapter_config.json does not exist"):
        ia3_lib.import_ia3_peft(missing, model, params)
    method = IA3()
    ia3_lib.export_ia3_peft(method, method.init(None, params), model, str(tmp_path / "a"))
    os.remove(tmp_path / "a" / peft_format.ADAPTER_WEIGHTS)
    with pytest.raises(FileNotFoundError, match=r"a/adapter_model.safetensors does not exist"):
        ia3_lib.import_ia3_peft(str(tmp_path / "a"), model, params)

    ia3_lib.export_ia3_peft(method, method.init(None, params), model, str(tmp_path / "b"))
    config_path = tmp_path / "b" / peft_format.ADAPTER_CONFIG
    config = json.load(open(config_path))
    json.dump({**config, "peft_type": "LORA"}, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"b/adapter_config.json: peft_type='LORA'; only 'IA3' "
                                         r"adapters import here") as info:
        ia3_lib.import_ia3_peft(str(tmp_path / "b"), model, params)
    one_line(info)
    json.dump(config, open(config_path, "w"))

    wider = tiny_model(mlp_dim=48)
    with pytest.raises(ValueError, match=r"encoder.layer.0.output.dense.ia3_l \(1, 64\) does "
                                         r"not fit this model's encoder/layer_0/mlp/wo/kernel "
                                         r"\(48, 32\) scaled on its feedforward \(input\), "
                                         r"which needs \(1, 48\)") as info:
        ia3_lib.import_ia3_peft(str(tmp_path / "b"), wider, random_params(wider))
    one_line(info)


# ---------------------------------------------------------------------------------------------
# PEFT interop, against peft in PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_side(tmp_path_factory, tiny):
    return save_torch_base(tmp_path_factory, *tiny, "peft_ia3")


def test_exported_adapter_matches_peft_in_torch(tiny, torch_side, tmp_path):
    import peft
    import transformers

    model, params = tiny
    method = IA3(**WIDE, also_train=(r"pooler/.*",))
    adapted = randomize_vectors(method.init(None, params))
    adapted = tree.map_with_path(lambda p, x: x + 0.5 if p.startswith("pooler/") else x, adapted)
    config = ia3_lib.export_ia3_peft(method, adapted, model, str(tmp_path / "adapter"),
                                     base_model_name_or_path=torch_side)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    saved = json.load(open(tmp_path / "adapter" / peft_format.ADAPTER_CONFIG))
    assert saved == config and saved["peft_type"] == "IA3"
    assert saved["modules_to_save"] == ["pooler.dense"]
    assert "encoder.layer.1.attention.output.dense" in saved["feedforward_modules"]
    assert "encoder.layer.1.intermediate.dense" not in saved["feedforward_modules"]

    base = transformers.BertModel.from_pretrained(torch_side)
    torch_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ffn = torch_model.base_model.model.encoder.layer[0].output.dense
    assert ffn.is_feedforward and tuple(ffn.ia3_l["default"].shape) == (1, 64)
    ids, mask, types = token_batch()
    theirs = torch_bert_outputs(torch_model, ids, mask, types)
    ours = forward(model, method, adapted, ids, mask, types)
    assert gap(ours[0], theirs[0]) < 1e-4 and gap(ours[1], theirs[1]) < 1e-4

    # ...and it reads back into the same tree and the same function.
    again_method, again = ia3_lib.import_ia3_peft(str(tmp_path / "adapter"), model, params)
    assert set(tree.flatten(again)) == set(tree.flatten(adapted))
    for path, value in tree.flatten(adapted).items():
        np.testing.assert_allclose(tree.flatten(again)[path], value, atol=1e-7, err_msg=path)
    assert {p: t.feedforward for p, t in again_method.plan(again).items()} == {
        p: t.feedforward for p, t in method.plan(adapted).items()}
    assert again_method.trainable == (ia3_lib.VECTOR_PATTERN, "pooler/bias", "pooler/kernel")


def test_short_module_names_when_they_select_exactly(tiny, torch_side, tmp_path):
    import peft
    import transformers

    model, params = tiny
    method = IA3(targets=(r".*/attn/(key|value)/kernel",), feedforward=(r".*/value/kernel",))
    adapted = randomize_vectors(method.init(None, params), seed=4)
    config = ia3_lib.export_ia3_peft(method, adapted, model, str(tmp_path / "adapter"))
    assert (config["target_modules"], config["feedforward_modules"]) == (["key", "value"],
                                                                         ["value"])
    base = transformers.BertModel.from_pretrained(torch_side)
    torch_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids, mask, types = token_batch(seed=2)
    theirs = torch_bert_outputs(torch_model, ids, mask, types)
    ours = forward(model, method, adapted, ids, mask, types)
    assert gap(ours[0], theirs[0]) < 1e-4 and gap(ours[1], theirs[1]) < 1e-4


def test_peft_created_adapter_imports(tiny, torch_side, tmp_path):
    import peft
    import torch
    import transformers

    model, params = tiny
    torch.manual_seed(0)
    base = transformers.BertModel.from_pretrained(torch_side)
    # init_ia3_weights=False: random normal vectors, so every scaling shows. "output.dense" is
    # a suffix of both the MLP's and attention's output projection: PEFT scales both on input.
    torch_model = peft.get_peft_model(base, peft.IA3Config(
        target_modules=["key", "value", "intermediate.dense", "output.dense"],
        feedforward_modules=["output.dense"], init_ia3_weights=False)).eval()
    torch_model.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, types = token_batch(seed=1)
    theirs = torch_bert_outputs(torch_model, ids, mask, types)

    method, adapted = ia3_lib.import_ia3_peft(str(tmp_path / "adapter"), model, params)
    plan = method.plan(adapted)
    assert plan["encoder/layer_1/attn/out/kernel"].feedforward
    assert plan["encoder/layer_1/mlp/wo/kernel"].feedforward
    assert not plan["encoder/layer_1/mlp/wi/kernel"].feedforward
    assert not plan["encoder/layer_0/attn/key/kernel"].feedforward
    assert "encoder/layer_0/attn/query/kernel" not in plan
    ours = forward(model, method, adapted, ids, mask, types)
    assert gap(ours[0], theirs[0]) < 1e-4 and gap(ours[1], theirs[1]) < 1e-4
    # The folded export is the same function as well.
    plain = forward(model, None, method.export(adapted), ids, mask, types)
    assert gap(plain[0], theirs[0]) < 1e-4
