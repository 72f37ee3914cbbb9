"""LoHa and LoKr as tree transforms: factor shapes (LoKr's split and choice of full or
decomposed factors as PEFT makes them), axes and what trains; fresh factors change nothing;
one layer and the multi-axis kernels against a numpy formula; export folds ΔW into the plain
model; a scanned stack computes the same; training moves only the factors; PEFT adapters match
``peft`` in PyTorch both ways; bad input is a one-line error."""

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from research import methods, models, peft_format, tree  # noqa: E402
from research.lowrank import lycoris  # noqa: E402
from research.lowrank.loha import LoHa  # noqa: E402
from research.lowrank.lokr import LoKr, factorization  # noqa: E402
from research.train import loop, optim  # noqa: E402
from tests.tiny_bert import (  # noqa: E402
    tiny_model, random_params, token_batch, forward, gap, one_line, loop_config, loop_setup,
    random_batch, assert_only_trainable_moved, save_torch_base, torch_bert_outputs
)

# Multi-axis inputs (attn/out) and outputs (query, value), Dense both ways, several ranks.
RULES = ((r"encoder/layer_1/attn/query/kernel", None), (r"encoder/.*/attn/query/kernel", 3),
         (r"encoder/.*/attn/(value|out)/kernel", 2), (r"encoder/.*/mlp/(wi|wo)/kernel", 8))
METHODS = {
    "loha": lambda **kw: LoHa(targets=RULES, alpha=6.0,
                              alpha_rules=((r".*/mlp/.*", 2.0),), **kw),
    # Factor 4: every side splits 4 x (side / 4); decompose_both with these ranks gives every
    # mix of full and decomposed W1 / W2 (see test_factor_shapes...).
    "lokr": lambda **kw: LoKr(targets=RULES, alpha=6.0, alpha_rules=((r".*/mlp/.*", 2.0),),
                              decompose_both=True, decompose_factor=4, **kw),
}


def randomize_factors(method, params, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    return tree.map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0.0, scale, x.shape), jnp.float32)
        if p.rpartition("/")[2] in method.factor_names else x, params)


def factors_of(params, method) -> dict:
    return {p: v for p, v in tree.flatten(params).items()
            if p.rpartition("/")[2] in method.factor_names}


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, random_params(model)


def test_lokr_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), \
                (dimension, factor)
    assert factorization(384) == (16, 24) and factorization(1536) == (32, 48)


def test_factor_shapes_axes_and_what_trains():
    model = tiny_model("classifier")
    shapes = model.param_shapes()
    loha = METHODS["loha"](also_train=(r"classifier/.*",))
    got = tree.flatten(jax.eval_shape(loha.init, jax.random.key(0), shapes))
    # torch's [out, in] frame: query [32 in] -> [4 heads x 8] out; attn/out [4 x 8] in.
    assert got["encoder/layer_0/attn/query/hada_w1_a"].shape == (32, 3)
    assert got["encoder/layer_0/attn/query/hada_w2_b"].shape == (3, 32)
    assert got["encoder/layer_1/mlp/wi/hada_w1_a"].shape == (64, 8)
    assert got["encoder/layer_1/mlp/wo/hada_w2_b"].shape == (8, 64)
    assert "encoder/layer_1/attn/query/hada_w1_a" not in got  # the rank-None exclusion
    assert "encoder/layer_0/attn/key/hada_w1_a" not in got
    plan = loha.plan(shapes)
    assert plan["encoder/layer_0/attn/out/kernel"].scale == 3.0
    assert plan["encoder/layer_0/mlp/wo/kernel"].scale == 0.25

    lokr = METHODS["lokr"]()
    got = tree.flatten(jax.eval_shape(lokr.init, jax.random.key(0), shapes))
    names = {module: {p.rpartition("/")[2]: tuple(got[p].shape) for p in got
                      if p.startswith(f"encoder/layer_0/{module}/lokr")}
             for module in ("attn/query", "attn/value", "mlp/wi")}
    # 32 = 4 x 8, 64 = 4 x 16. r=3: W1 [4, 4] full (3 >= 4/2), W2 [8, 8] decomposed (3 < 8/2).
    assert names["attn/query"] == {"lokr_w1": (4, 4), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 8)}
    # r=2: W1 full (2 >= 2), W2 decomposed; r=8 on wi [64 out, 32 in]: both full (8 >= 16/2).
    assert names["attn/value"] == {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    assert names["mlp/wi"] == {"lokr_w1": (4, 4), "lokr_w2": (16, 8)}
    one = LoKr(targets=((r".*/attn/key/kernel", 1),), decompose_both=True)
    got = tree.flatten(jax.eval_shape(one.init, jax.random.key(0), shapes))
    assert {p.rpartition("/")[2]: got[p].shape for p in got if "layer_0/attn/key/lokr" in p} \
        == {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}

    for method in (loha, lokr):
        init_shapes = jax.eval_shape(method.init, jax.random.key(0), shapes)
        logical = tree.flatten(method.logical_axes(loop.abstract_params(model)[1], init_shapes))
        added = factors_of(init_shapes, method)
        assert all(logical[p] == (None, None) for p in added)
        assert logical["encoder/layer_0/attn/query/kernel"] == ("embed", "heads", "head_dim")
    mask = tree.flatten(optim.trainable_mask(jax.eval_shape(loha.init, jax.random.key(0),
                                                            shapes), (), loha.trainable))
    trained = {p for p, t in mask.items() if t}
    assert trained == set(factors_of(jax.eval_shape(loha.init, jax.random.key(0), shapes),
                                     loha)) | {"classifier/kernel", "classifier/bias"}
    # Lists from a config file work.
    built = methods.build(dict(name="lokr", targets=[[r".*/attn/key/kernel", 2]],
                               decompose_factor=4))
    assert isinstance(built, LoKr) and built.targets == ((r".*/attn/key/kernel", 2),)


@pytest.mark.parametrize("name, init, zero", [
    ("loha", True, {"hada_w2_b"}), ("lokr", True, {"lokr_w1"}),
    ("lokr", "lycoris", {"lokr_w2", "lokr_w2_b"})])
def test_fresh_factors_leave_outputs_unchanged(tiny, name, init, zero):
    model, params = tiny
    method = METHODS[name](init_weights=init)
    adapted = method.init(jax.random.key(0), params)
    for path, value in factors_of(adapted, method).items():
        value = np.asarray(value)
        if path.rpartition("/")[2] in zero:
            assert np.all(value == 0), path
        else:  # torch's kaiming_uniform_(a=sqrt(5)): U(±1/sqrt(fan_in)), fan_in = dim 1
            bound = 1 / np.sqrt(value.shape[1])
            assert bound / 2 < np.abs(value).max() <= bound, path
    ids, mask, types = token_batch()
    for x, y in zip(forward(model, None, params, ids, mask, types),
                    forward(model, method, adapted, ids, mask, types)):
        assert gap(x, y) < 1e-6
    noisy = METHODS[name](init_weights=False).init(jax.random.key(0), params)
    assert all(np.abs(np.asarray(v)).max() > 0 for v in factors_of(noisy, method).values())


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="wo")(jax.nn.relu(nn.Dense(8, name="wi")(x)))


def _numpy_delta(name: str, f: dict, scale: float) -> np.ndarray:
    """ΔW [out, in] as the papers write it."""
    if name == "loha":
        return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * scale
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    return np.kron(w1, w2) * scale


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_one_layer_against_numpy(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32),
                          jax.eval_shape(TwoDense().init, jax.random.key(0), x)["params"])
    cls = LoHa if name == "loha" else LoKr
    method = cls(targets=((r"wi/kernel", 2), (r"wo/kernel", 1)), alpha=3.0)
    adapted = randomize_factors(method, method.init(jax.random.key(1), params))
    f = {p: np.asarray(v, np.float64) for p, v in tree.flatten(adapted).items()}

    def layer(module, h, scale):
        mine = {p.rpartition("/")[2]: v for p, v in f.items() if p.startswith(module + "/")}
        delta = _numpy_delta(name, mine, scale)  # [out, in]: torch's, so x · ΔWᵀ
        return h @ (mine["kernel"] + delta.T) + mine["bias"]
    want = layer("wo", np.maximum(layer("wi", x, 1.5), 0), 3.0)
    ours = method.apply(TwoDense(), {"params": adapted}, x).outputs
    assert gap(ours, want) < 1e-4
    exported = method.export(adapted)
    assert set(tree.flatten(exported)) == set(tree.flatten(params))
    assert gap(TwoDense().apply({"params": exported}, x), want) < 1e-4


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_export_folds_into_the_plain_model_with_torch_s_axes(tiny, name):
    model, params = tiny
    ids, mask, types = token_batch()
    method = METHODS[name]()
    adapted = randomize_factors(method, method.init(jax.random.key(0), params))
    ours = forward(model, method, adapted, ids, mask, types)
    exported = method.export(adapted)
    tree.check_same_structure(exported, params)
    plain = forward(model, None, exported, ids, mask, types)
    assert gap(ours[0], plain[0]) < 1e-5 and gap(ours[1], plain[1]) < 1e-5
    assert gap(ours[0], forward(model, None, params, ids, mask, types)[0]) > 1e-2
    # Multi-axis kernels take ΔW [out, in] flattened as torch lays them out: query's out is
    # heads-major [heads * head_dim]; attn/out's in likewise.
    flat, folded = tree.flatten(adapted), tree.flatten(exported)
    for module, scale, shape in (("attn/query", 6.0 / 3, (32, 4, 8)),
                                 ("attn/out", 6.0 / 2, (4, 8, 32))):
        prefix = f"encoder/layer_0/{module}/"
        mine = {p[len(prefix):]: np.asarray(v, np.float64) for p, v in flat.items()
                if p.startswith(prefix)}
        want = mine["kernel"] + _numpy_delta(name, mine, scale).T.reshape(shape)
        assert gap(folded[prefix + "kernel"], want) < 1e-5, module


def test_a_scanned_stack_computes_the_same(tiny):
    model, params = tiny
    scanned = tiny_model(scan_layers=True)
    ids, mask, types = token_batch(seed=3)
    for name in ("loha", "lokr"):
        method = dataclasses.replace(METHODS[name](), targets=((r"encoder/.*/kernel", 2),),
                                     alpha_rules=())
        adapted = randomize_factors(method, method.init(jax.random.key(0), params))
        want = forward(model, method, adapted, ids, mask, types)
        got = forward(scanned, method, adapted, ids, mask, types)
        assert gap(want[0], got[0]) < 1e-5, name


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_training_under_the_loop_moves_only_the_factors(name):
    setup, state = loop_setup(loop_config(dict(
        name=name, targets=((r"encoder/.*/attn/(query|out)/kernel", 2),),
        also_train=(r"classifier/.*",))))
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    factors = {p for p in trainable if p.startswith("encoder/")}
    assert set(trainable) == factors | {"classifier/kernel", "classifier/bias"}
    assert {p.rsplit("/", 1)[0] for p in factors} == {"encoder/layer_0/attn/query",
                                                      "encoder/layer_0/attn/out"}
    batch = random_batch(setup)
    step = loop.make_train_step(setup)
    # Two steps: at step 0 only the zero factor has a gradient (the others multiply it).
    for _ in range(2):
        state, _ = step(state, batch)
    assert_only_trainable_moved(before, jax.device_get(state))


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_config_file_builds_the_method(name):
    import importlib

    config = importlib.import_module(f"configs.minilm_{name}").get_config("quick")
    method = methods.build(config.method)
    assert isinstance(method, LoHa if name == "loha" else LoKr) and config.train.steps == 4
    shapes = models.build("minilm_l6_classifier", num_classes=2).param_shapes()
    plan = method.plan(shapes)
    assert len(plan) == 6 * 6 + 1 and {t.rank for t in plan.values()} == {8}
    added = tree.flatten(jax.eval_shape(method.init, jax.random.key(0), shapes))
    trained = sum(int(np.prod(v.shape)) for p, v in added.items()
                  if p.rpartition("/")[2] in method.factor_names)
    assert 0 < trained < 0.05 * tree.count(shapes)


def test_bad_input_is_a_one_line_error(tiny, tmp_path):
    model, params = tiny
    for rank in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=rf"config.method.targets: LoHa rule '.\*' has "
                                             rf"rank {rank!r}; ranks are integers >= 1") as info:
            LoHa(targets=((r".*", rank),))
        one_line(info)
    with pytest.raises(ValueError, match=r"LoKr target rule 'encoder/.\*/kernal' matches no "
                                         r"parameter; closest: encoder/") as info:
        LoKr(targets=((r"encoder/.*/kernal", 4),)).plan(params)
    one_line(info)
    with pytest.raises(ValueError, match=r"LoHa's rules leave no kernel adapted"):
        LoHa(targets=((r".*", None),)).plan(params)
    for key in ("rank_dropout", "module_dropout"):
        with pytest.raises(ValueError, match=rf"config.method.{key}=0.1: LoKr supports only "
                                             rf"0.0") as info:
            methods.build(dict(name="lokr", targets=((r".*", 2),), **{key: 0.1}))
        one_line(info)
    with pytest.raises(ValueError, match=r"config.method.init_weights='lycoris' is not one of "
                                         r"\[True, False\]"):
        LoHa(targets=((r".*", 2),), init_weights="lycoris")
    with pytest.raises(ValueError, match=r"config.method.decompose_factor=0 is neither -1"):
        LoKr(targets=((r".*", 2),), decompose_factor=0)
    with pytest.raises(ValueError, match="config.method for 'loha'.*rank"):
        methods.build(dict(name="loha", targets=((r".*", 2),), rank=4))
    # Factors that do not fit the kernel (LoKr's split changed under them).
    lokr = LoKr(targets=((r".*/attn/key/kernel", 2),))
    adapted = lokr.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"LoKr factors at encoder/layer_0/attn/key are "
                                         r"\{'lokr_w1': \(4, 4\), 'lokr_w2_a': \(8, 2\), "
                                         r"'lokr_w2_b': \(2, 8\)\}; "
                                         r"encoder/layer_0/attn/key/kernel \(32, 4, 8\) at "
                                         r"rank 2 needs") as info:
        LoKr(targets=((r".*/attn/key/kernel", 2),), decompose_factor=2).export(adapted)
    one_line(info)

    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere/adapter_config.json does not exist"):
        lycoris.import_lycoris_peft(missing, model, params)
    loha = METHODS["loha"]()
    lycoris.export_lycoris_peft(loha, loha.init(jax.random.key(0), params), model,
                                str(tmp_path / "a"))
    config_path = tmp_path / "a" / peft_format.ADAPTER_CONFIG
    config = json.load(open(config_path))
    for change, message in (
            (dict(peft_type="LORA"), r"a/adapter_config.json: peft_type='LORA'; only 'LOHA' "
                                     r"and 'LOKR' adapters import here"),
            (dict(rank_dropout=0.25), r"a/adapter_config.json: rank_dropout=0.25 is not "
                                      r"supported \(only 0.0\)"),
            (dict(r=3), r"adapter_model.safetensors: adapter module "
                        r"'encoder.layer.0.intermediate.dense' holds \{'hada_w1_a': "
                        r"\(64, 8\).* at r=3 needs \{'hada_w1_a': \(64, 3\)"),
            (dict(rank_pattern={"dense": 0}), r"module 'encoder.layer.0.attention.output.dense' "
                                              r"has rank 0 \(r / rank_pattern\); ranks are "
                                              r"integers >= 1")):
        json.dump({**config, **change}, open(config_path, "w"))
        with pytest.raises(ValueError, match=message) as info:
            lycoris.import_lycoris_peft(str(tmp_path / "a"), model, params)
        one_line(info)
    json.dump(config, open(config_path, "w"))

    wider = tiny_model(mlp_dim=48)
    with pytest.raises(ValueError, match=r"adapter module 'encoder.layer.0.intermediate.dense' "
                                         r"holds \{'hada_w1_a': \(64, 8\).*this model's "
                                         r"encoder/layer_0/mlp/wi/kernel \(32, 48\) at r=8 "
                                         r"needs \{'hada_w1_a': \(48, 8\)") as info:
        lycoris.import_lycoris_peft(str(tmp_path / "a"), wider, random_params(wider))
    one_line(info)


# ---------------------------------------------------------------------------------------------
# PEFT interop, against peft in PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_side(tmp_path_factory, tiny):
    return save_torch_base(tmp_path_factory, *tiny, "peft_lycoris")


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_exported_adapter_matches_peft_in_torch(tiny, torch_side, tmp_path, name):
    import peft
    import transformers

    model, params = tiny
    method = METHODS[name](also_train=(r"pooler/.*",))
    adapted = randomize_factors(method, method.init(jax.random.key(0), params))
    adapted = tree.map_with_path(lambda p, x: x + 0.5 if p.startswith("pooler/") else x, adapted)
    config = lycoris.export_lycoris_peft(method, adapted, model, str(tmp_path / "adapter"),
                                         base_model_name_or_path=torch_side)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    saved = json.load(open(tmp_path / "adapter" / peft_format.ADAPTER_CONFIG))
    assert saved == config and saved["peft_type"] == name.upper()
    assert saved["modules_to_save"] == ["pooler.dense"] and saved["r"] == 8
    assert saved["rank_pattern"]["encoder\\.layer\\.0\\.attention\\.self\\.query"] == 3
    if name == "lokr":
        assert (saved["decompose_both"], saved["decompose_factor"]) == (True, 4)

    base = transformers.BertModel.from_pretrained(torch_side)
    torch_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids, mask, types = token_batch()
    theirs = torch_bert_outputs(torch_model, ids, mask, types)
    ours = forward(model, method, adapted, ids, mask, types)
    assert gap(ours[0], theirs[0]) < 1e-4 and gap(ours[1], theirs[1]) < 1e-4

    # ...and it reads back into the same tree and the same function.
    again_method, again = lycoris.import_lycoris_peft(str(tmp_path / "adapter"), model, params)
    assert type(again_method) is type(method)
    assert set(tree.flatten(again)) == set(tree.flatten(adapted))
    for path, value in tree.flatten(adapted).items():
        np.testing.assert_allclose(tree.flatten(again)[path], value, atol=1e-7, err_msg=path)
    assert {p: t.scale for p, t in again_method.plan(again).items()} == {
        p: t.scale for p, t in method.plan(adapted).items()}
    assert again_method.trainable[1:] == ("pooler/bias", "pooler/kernel")


@pytest.mark.parametrize("name", ["loha", "lokr"])
def test_peft_created_adapter_imports(tiny, torch_side, tmp_path, name):
    import peft
    import torch
    import transformers

    model, params = tiny
    torch.manual_seed(0)
    base = transformers.BertModel.from_pretrained(torch_side)
    # init_weights=False: every factor random, so every one shows in the outputs.
    # "output.dense" is a suffix of both the MLP's and attention's output projection.
    shared = dict(target_modules=["query", "value", "intermediate.dense", "output.dense"],
                  alpha_pattern={"value": 5}, init_weights=False)
    if name == "loha":
        config = peft.LoHaConfig(r=3, alpha=4, rank_pattern={"intermediate.dense": 2}, **shared)
    else:
        # r=2 on query: W1 full, W2 decomposed; value r=1: both decomposed; intermediate r=8:
        # both full.
        config = peft.LoKrConfig(r=2, alpha=4, rank_pattern={"value": 1, "intermediate.dense": 8},
                                 decompose_both=True, **shared)
    torch_model = peft.get_peft_model(base, config).eval()
    torch_model.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, types = token_batch(seed=1)
    theirs = torch_bert_outputs(torch_model, ids, mask, types)

    method, adapted = lycoris.import_lycoris_peft(str(tmp_path / "adapter"), model, params)
    assert type(method) is (LoHa if name == "loha" else LoKr)
    plan = method.plan(adapted)
    assert set(plan) == {f"encoder/layer_{i}/{m}/kernel" for i in range(2)
                         for m in ("attn/query", "attn/value", "attn/out", "mlp/wi", "mlp/wo")}
    assert plan["encoder/layer_1/attn/value/kernel"].scale == 5 / (3 if name == "loha" else 1)
    if name == "lokr":
        assert set(factors_of(adapted, method)) >= {"encoder/layer_0/attn/query/lokr_w1",
                                                    "encoder/layer_0/attn/value/lokr_w1_a",
                                                    "encoder/layer_0/mlp/wi/lokr_w2"}
    ours = forward(model, method, adapted, ids, mask, types)
    assert gap(ours[0], theirs[0]) < 1e-4 and gap(ours[1], theirs[1]) < 1e-4
    assert gap(ours[0], forward(model, None, params, ids, mask, types)[0]) > 1e-3
    # The folded export is the same function as well.
    plain = forward(model, None, method.export(adapted), ids, mask, types)
    assert gap(plain[0], theirs[0]) < 1e-4
