"""LoRA as a tree transform: factor shapes for Dense, multi-axis and embedding targets; a fresh
adapter changes nothing; the adapted forward equals the merged one; merge/unmerge round trip;
the step skips the frozen weight gradients (XLA FLOPs); training under the loop moves only the
factors; PEFT adapters match ``peft`` in PyTorch both ways; bad input is a one-line error."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import common  # noqa: E402
from research import methods, models, peft_format, tree  # noqa: E402
from research.lowrank import lora as lora_lib  # noqa: E402
from research.lowrank import peft as peft_lib  # noqa: E402
from research.lowrank.lora import LoRA  # noqa: E402
from research.train import loop, optim  # noqa: E402
from tests.tiny_bert import (  # noqa: E402
    tiny_model, random_params, token_batch, forward, assert_only_trainable_moved,
    save_torch_base, torch_bert_outputs
)

TARGETS = ((r"encoder/.*/attn/(query|out)/kernel", 4), (r"encoder/.*/mlp/wi/kernel", 2),
           (r"embeddings/word/embedding", 3))


def randomize_factors(params, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    return tree.map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0.0, scale, x.shape), jnp.float32)
        if p.endswith(("lora_a", "lora_b")) else x, params)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, random_params(model)


def test_factor_shapes_for_dense_multi_axis_and_embedding():
    model = tiny_model("classifier")
    method = LoRA(targets=TARGETS, also_train=(r"classifier/.*",))
    shapes = tree.flatten(jax.eval_shape(method.init, jax.random.key(0), model.param_shapes()))
    expected = {
        "encoder/layer_0/attn/query": ((32, 4), (4, 4, 8)),     # [embed, r] [r, heads, head_dim]
        "encoder/layer_1/attn/out": ((4, 8, 4), (4, 32)),       # [heads, head_dim, r] [r, embed]
        "encoder/layer_0/mlp/wi": ((32, 2), (2, 64)),           # Dense [in, r] [r, out]
        "embeddings/word": ((100, 3), (3, 32)),                 # [vocab, r] [r, embed]
    }
    for module, (a, b) in expected.items():
        assert (shapes[f"{module}/lora_a"].shape, shapes[f"{module}/lora_b"].shape) == (a, b)
    added = [p for p in shapes if p.endswith(("lora_a", "lora_b"))]
    assert len(added) == 2 * (2 * 2 + 2 + 1)
    assert "encoder/layer_0/attn/key/lora_a" not in shapes  # not a target

    logical = method.logical_axes(loop.abstract_params(model)[1], jax.eval_shape(
        method.init, jax.random.key(0), model.param_shapes()))
    logical = tree.flatten(logical)
    assert logical["encoder/layer_0/attn/query/lora_a"] == ("embed", None)
    assert logical["encoder/layer_0/attn/query/lora_b"] == (None, "heads", "head_dim")
    assert logical["encoder/layer_1/attn/out/lora_a"] == ("heads", "head_dim", None)
    assert logical["embeddings/word/lora_b"] == (None, "embed")

    # By default only the factors (and also_train) train.
    mask = tree.flatten(optim.trainable_mask(tree.unflatten(shapes), (), method.trainable))
    assert {p for p, t in mask.items() if t} == set(added) | {"classifier/kernel",
                                                                "classifier/bias"}
    assert isinstance(methods.build(dict(name="lora", targets=TARGETS)), LoRA)


def test_fresh_adapter_leaves_outputs_unchanged(tiny):
    model, params = tiny
    method = LoRA(targets=TARGETS, alpha=16.0, alpha_rules=((r".*/wi/kernel", 4.0),))
    adapted = method.init(jax.random.key(1), params)
    ids, mask, types = token_batch()
    base = forward(model, None, params, ids, mask, types)
    ours = forward(model, method, adapted, ids, mask, types)
    for x, y in zip(base, ours):  # two compiled graphs: equal up to fusion order
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    flat = tree.flatten(adapted)
    assert np.abs(flat["encoder/layer_0/mlp/wi/lora_a"]).max() <= 1 / np.sqrt(32)  # kaiming
    assert not np.any(flat["encoder/layer_0/mlp/wi/lora_b"])                      # B = 0


def test_adapted_forward_equals_merged_forward_and_unmerge_round_trips(tiny):
    model, params = tiny
    ids, mask, types = token_batch()
    for method in (LoRA(targets=TARGETS, alpha=16.0, alpha_rules=((r".*/wi/kernel", 4.0),)),
                   LoRA(targets=TARGETS, alpha=16.0, rslora=True)):
        adapted = randomize_factors(method.init(jax.random.key(1), params))
        scales = tree.flatten(method.scales(adapted))
        root = np.sqrt if method.rslora else (lambda r: r)
        assert scales["encoder/layer_0/attn/query/kernel"] == pytest.approx(16.0 / root(4))
        assert scales["encoder/layer_0/mlp/wi/kernel"] == pytest.approx(
            (16.0 if method.rslora else 4.0) / root(2))

        ours = forward(model, method, adapted, ids, mask, types)
        merged = lora_lib.merge(adapted, method)
        assert tree.structural_diff(params, merged) == tree.structural_diff(params, params)
        theirs = forward(model, None, merged, ids, mask, types)
        assert np.abs(np.asarray(ours[0]) - np.asarray(theirs[0])).max() < 1e-5
        assert np.abs(np.asarray(ours[0]) - np.asarray(
            forward(model, None, params, ids, mask, types)[0])).max() > 1e-2

        adapter, scale_tree = lora_lib.lora_factors(adapted, method)
        assert all(p.endswith(("lora_a", "lora_b")) for p in tree.flatten(adapter))
        assert tree.flatten(scale_tree) == scales
        back = lora_lib.unmerge(merged, adapter, scale_tree)
        tree.check_same_structure(back, adapted)
        for path, value in tree.flatten(adapted).items():
            np.testing.assert_allclose(tree.flatten(back)[path], value, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("input_axes", [1, 2])
def test_low_rank_path_gradients_equal_autodiff(input_axes):
    rng = np.random.default_rng(0)
    in_shape = (4, 6) if input_axes == 2 else (6,)
    x, a, b, weight = (rng.normal(size=shape).astype(np.float32) for shape in (
        (2, 5, *in_shape), (*in_shape, 3), (3, 2, 7), (2, 5, 2, 7)))
    def ours(x, a, b):
        return jnp.sum(lora_lib.low_rank(x, a, b, input_axes, 0.5) * weight)
    def plain(x, a, b):
        return jnp.sum(0.5 * jnp.tensordot(jnp.tensordot(x, a, input_axes), b, 1) * weight)
    grads = [jax.jit(jax.grad(fn, (0, 1, 2)))(x, a, b) for fn in (ours, plain)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class _OneDense(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        del deterministic  # read by LoRA.apply
        return nn.Dense(8, name="inner")(x)


def test_dropout_on_the_low_rank_path():
    module = _OneDense()
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    params = module.init(jax.random.key(0), x)["params"]
    method = LoRA(targets=((r"inner/kernel", 2),), dropout=0.5)
    adapted = randomize_factors(method.init(jax.random.key(1), params))

    def apply(deterministic, seed):
        return method.apply(module, {"params": adapted}, x, deterministic=deterministic,
                            rngs={"dropout": jax.random.key(seed)}).outputs

    plain = apply(True, 0)
    np.testing.assert_array_equal(plain, apply(True, 1))  # no randomness when deterministic
    np.testing.assert_allclose(plain, lora_lib.merge(adapted, method)["inner"]["bias"]
                               + x @ lora_lib.merge(adapted, method)["inner"]["kernel"],
                               atol=1e-5)
    dropped = apply(False, 0)
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(dropped, apply(False, 0))
    assert np.abs(dropped - apply(False, 1)).max() > 1e-3


def test_bad_input_is_a_one_line_error(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match=r"LoRA target rule 'encoder/.*/kernal' matches no "
                                         r"parameter; closest: "):
        LoRA(targets=((r"encoder/.*/kernal", 4),)).plan(params)
    with pytest.raises(ValueError, match=r"rank 40 for encoder/layer_0/mlp/wi/kernel exceeds "
                                         r"its smaller side: \(32, 64\) is 32"):
        LoRA(targets=((r".*/wi/kernel", 40),)).plan(params)
    with pytest.raises(ValueError, match=r"LoRA alpha rule '.*/nothing' matches no parameter"):
        LoRA(targets=TARGETS, alpha_rules=((r".*/nothing", 2.0),)).plan(params)
    with pytest.raises(ValueError, match="init_weights='xavier' is not one of"):
        LoRA(targets=TARGETS, init_weights="xavier")
    with pytest.raises(ValueError, match="config.method for 'lora'.*rank_pattern"):
        methods.build(dict(name="lora", targets=TARGETS, rank_pattern={}))
    with pytest.raises(ValueError) as info:
        LoRA(targets=((r".*/wi/kernel", 40),)).plan(params)
    assert "\n" not in str(info.value)


def _setup(method, *, hidden=32, layers=2, heads=4, batch=8, steps=10, mesh=None):
    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = dict(num_classes=2, vocab_size=1000, hidden_size=hidden,
                                  num_heads=heads, mlp_dim=4 * hidden, num_layers=layers,
                                  hidden_dropout=0.0, attention_dropout=0.0)
    config.train.batch_size = batch
    config.optim.learning_rate = 1e-2
    config.optim.schedule = "constant"
    config.mesh = mesh or dict(data=1)
    config.method = method
    return config, loop.make_setup(config, loop.build_model(config), steps,
                                   devices=None if mesh else jax.devices()[:1])


def _batch(setup, rows, length, seed=0):
    rng = np.random.default_rng(seed)
    return loop.global_batch(setup, {
        "input_ids": rng.integers(1, 1000, (rows, length)).astype(np.int32),
        "attention_mask": np.ones((rows, length), np.int32),
        "token_type_ids": np.zeros((rows, length), np.int32),
        "label": rng.integers(0, 2, (rows,)).astype(np.int32)})


LOOP_LORA = dict(name="lora", targets=((r"encoder/.*/kernel", 4),), alpha=8.0,
                 also_train=(r"classifier/.*",))


def test_lora_step_skips_frozen_weight_gradients():
    """XLA's FLOP count: the LoRA step does the forward and the input gradients of the frozen
    kernels but not their weight gradients (ideal 2/3 for the matmul part)."""
    figures = {}
    for name, method in (("full", dict(name="full")), ("lora", LOOP_LORA)):
        _, setup = _setup(method, hidden=64, heads=4)
        compiled = loop.make_train_step(setup).lower(
            setup.abstract_state, _batch(setup, 8, 32)).compile()
        figures[name] = float(compiled.cost_analysis()["flops"])
    ratio = figures["lora"] / figures["full"]
    assert ratio < 0.8, figures


def test_training_under_the_loop_moves_only_the_factors():
    # On 8 fake devices, factors laid out by their logical axes (FSDP x tensor).
    config, setup = _setup(LOOP_LORA, layers=1, mesh=dict(fsdp=4, tensor=2))
    assert isinstance(setup.method, LoRA)
    state = loop.init_state(config, setup)
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    assert all(p.endswith(("lora_a", "lora_b")) or p.startswith("classifier/")
               for p in trainable)
    assert "encoder/layer_0/mlp/wo/lora_b" in trainable and "classifier/kernel" in trainable
    assert not any(p.endswith(("lora_a", "lora_b")) for p in tree.flatten(before["frozen"]))
    # Adam's moments exist for the trainable leaves only.
    mu = tree.flatten(before["opt_state"][1].mu)
    assert set(mu) == set(trainable)
    spec = tree.flatten(state["trainable"])["encoder/layer_0/attn/query/lora_b"].sharding.spec
    assert tuple(spec) == (None, "tensor", None)  # [rank, heads, head_dim]

    step = loop.make_train_step(setup)
    for index in range(2):
        state, _ = step(state, _batch(setup, 8, 16, seed=index))
    assert_only_trainable_moved(before, jax.device_get(state))


def test_config_file_builds_a_lora_run():
    from configs import minilm_lora

    config = minilm_lora.get_config("quick")
    assert config.method.name == "lora" and config.train.steps == 4
    setup = loop.make_setup(config, loop.build_model(config), 4, devices=jax.devices()[:1])
    trainable = {p for p, t in tree.flatten(setup.trainable).items() if t}
    assert {"encoder/layer_5/attn/out/lora_a", "pooler/lora_b"} <= trainable
    assert {p for p in trainable if not p.endswith(("lora_a", "lora_b"))} == {
        "classifier/kernel", "classifier/bias"}


# ---------------------------------------------------------------------------------------------
# PEFT interop, against peft in PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_side(tmp_path_factory, tiny):
    return save_torch_base(tmp_path_factory, *tiny, "peft")


def test_exported_adapter_matches_peft_in_torch(tiny, torch_side, tmp_path):
    import peft
    import transformers

    model, params = tiny
    method = LoRA(targets=TARGETS, alpha=16.0, alpha_rules=((r".*/wi/kernel", 4.0),),
                  also_train=(r"pooler/.*",))
    adapted = randomize_factors(method.init(jax.random.key(1), params))
    adapted = tree.map_with_path(lambda p, x: x + 0.5 if p.startswith("pooler/") else x, adapted)
    config = peft_lib.export_peft(method, adapted, model, str(tmp_path / "adapter"),
                                  base_model_name_or_path=torch_side)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (
        4, 16.0, ["pooler.dense"])
    assert set(config["rank_pattern"].values()) == {2, 3} and set(
        config["alpha_pattern"].values()) == {4.0}
    saved = json.load(open(tmp_path / "adapter" / peft_format.ADAPTER_CONFIG))
    assert saved["peft_type"] == "LORA"

    base = transformers.BertModel.from_pretrained(torch_side)
    torch_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids, mask, types = token_batch()
    theirs = torch_bert_outputs(torch_model, ids, mask, types)
    ours = forward(model, method, adapted, ids, mask, types)
    assert np.abs(np.asarray(ours[0]) - theirs[0]).max() < 1e-4
    assert np.abs(np.asarray(ours[1]) - theirs[1]).max() < 1e-4

    # ...and it reads back into the same tree.
    again_method, again = peft_lib.import_peft(str(tmp_path / "adapter"), model, params)
    for path, value in tree.flatten(adapted).items():
        np.testing.assert_allclose(tree.flatten(again)[path], value, atol=1e-7, err_msg=path)
    assert tree.flatten(again_method.scales(again)) == tree.flatten(method.scales(adapted))


def test_peft_created_adapter_imports(tiny, torch_side, tmp_path):
    import peft
    import torch
    import transformers

    model, params = tiny
    torch.manual_seed(0)
    base = transformers.BertModel.from_pretrained(torch_side)
    torch_model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], use_rslora=True,
        init_lora_weights=False)).eval()
    torch_model.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, types = token_batch(seed=1)
    theirs = torch_bert_outputs(torch_model, ids, mask, types)

    method, adapted = peft_lib.import_peft(str(tmp_path / "adapter"), model, params)
    pairs = lora_lib.factor_pairs(tree.flatten(adapted))
    assert "pooler/kernel" in pairs and "encoder/layer_1/mlp/wo/kernel" in pairs
    assert "encoder/layer_0/attn/key/kernel" not in pairs and method.rslora
    ours = forward(model, method, adapted, ids, mask, types)
    assert np.abs(np.asarray(ours[0]) - theirs[0]).max() < 1e-4
    assert np.abs(np.asarray(ours[1]) - theirs[1]).max() < 1e-4


def test_adapter_for_another_base_is_a_one_line_error(tiny, tmp_path):
    model, params = tiny
    method = LoRA(targets=TARGETS)
    peft_lib.export_peft(method, method.init(jax.random.key(0), params), model,
                         str(tmp_path / "adapter"))
    wider = tiny_model(hidden_size=48, num_heads=4)
    with pytest.raises(ValueError, match=r"adapter module 'embeddings.word_embeddings': "
                                         r"lora_embedding_A \(3, 100\) and lora_embedding_B "
                                         r"\(32, 3\) do not fit this model's "
                                         r"embeddings/word/embedding \(100, 48\), which needs "
                                         r"\(3, 100\) and \(48, 3\)") as info:
        peft_lib.import_peft(str(tmp_path / "adapter"), wider, random_params(wider))
    assert "\n" not in str(info.value)
    llama = models.build("llama_tiny_lm", vocab_size=100, hidden_size=32, num_heads=4,
                         mlp_dim=64, num_layers=2)
    with pytest.raises(ValueError, match="has no counterpart in this llama model; closest"):
        peft_lib.import_peft(str(tmp_path / "adapter"), llama, random_params(llama))
