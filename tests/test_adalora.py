"""AdaLoRA as a tree transform: leaf shapes, axes and what trains; fresh leaves change nothing;
one layer and the orthogonality regulariser against numpy; export folds ``s·A·diag(E)·B``; the
rank allocator's averages, masks and rank pattern equal PEFT's ``RankAllocator`` step by step
on the same params and gradients, and its budget PEFT's schedule; under the loop only the
method's leaves train and the nonzero singular values follow the budget; PEFT adapters match
``peft`` in PyTorch both ways (rank patterns included); bad input is a one-line error."""

import json
import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from research import methods, models, peft_format, tree  # noqa: E402
from research.lowrank import adalora as adalora_lib  # noqa: E402
from research.lowrank.adalora import AdaLoRA  # noqa: E402
from research.models import hf  # noqa: E402
from research.train import checkpoint, loop, optim  # noqa: E402
from tests.tiny_bert import (  # noqa: E402
    tiny_model, random_params, token_batch, forward, gap, one_line, loop_config, random_batch,
    save_torch_base, torch_bert_outputs
)

# Multi-axis outputs (query, value), a multi-axis input (attn/out), a plain Dense (mlp/wi).
WIDE = (r"encoder/.*/attn/(query|value|out)/kernel", r"encoder/.*/mlp/wi/kernel")
PEFT_WIDE = ["query", "value", "attention.output.dense", "intermediate.dense"]
SCHEDULE = dict(init_r=3, target_r=1, tinit=2, tfinal=3, delta_t=2, total_step=12)
PEFT_SCHEDULE = dict(init_r=3, target_r=1, tinit=2, tfinal=3, deltaT=2, total_step=12)


def randomize_leaves(params, seed=1):
    """Every A, E, B random (E in ±[0.5, 1.5], so no singular value is zero)."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        if path.endswith(adalora_lib.E):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape) * rng.choice([-1, 1], x.shape),
                               jnp.float32)
        if path.endswith((adalora_lib.A, adalora_lib.B)):
            return jnp.asarray(rng.normal(0.0, 0.3, x.shape), jnp.float32)
        return x
    return tree.map_with_path(one, params)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, random_params(model)


def test_leaf_shapes_axes_and_what_trains():
    model = tiny_model("classifier")
    method = AdaLoRA(targets=WIDE, init_r=5, target_r=2, total_step=10,
                     also_train=(r"classifier/.*",))
    init_shapes = jax.eval_shape(method.init, jax.random.key(0), model.param_shapes())
    shapes = {p: s.shape for p, s in tree.flatten(init_shapes).items()}
    assert shapes["encoder/layer_0/attn/query/adalora_a"] == (32, 5)       # [embed, r]
    assert shapes["encoder/layer_0/attn/query/adalora_e"] == (5,)
    assert shapes["encoder/layer_0/attn/query/adalora_b"] == (5, 4, 8)     # [r, heads, dim]
    assert shapes["encoder/layer_1/attn/out/adalora_a"] == (4, 8, 5)       # [heads, dim, r]
    assert shapes["encoder/layer_1/attn/out/adalora_b"] == (5, 32)
    assert shapes["encoder/layer_0/mlp/wi/adalora_b"] == (5, 64)
    added = [p for p in shapes if "adalora_" in p]
    assert len(added) == 3 * 4 * 2 and "encoder/layer_0/attn/key/adalora_e" not in shapes

    logical = tree.flatten(method.logical_axes(loop.abstract_params(model)[1], init_shapes))
    assert logical["encoder/layer_0/attn/query/adalora_a"] == ("embed", None)
    assert logical["encoder/layer_0/attn/query/adalora_b"] == (None, "heads", "head_dim")
    assert logical["encoder/layer_0/attn/out/adalora_a"] == ("heads", "head_dim", None)
    assert logical["encoder/layer_0/attn/out/adalora_e"] == (None,)

    mask = tree.flatten(optim.trainable_mask(init_shapes, (), method.trainable))
    assert {p for p, t in mask.items() if t} == set(added) | {"classifier/kernel",
                                                                "classifier/bias"}
    default = methods.build(dict(name="adalora", total_step=10))
    assert isinstance(default, AdaLoRA) and (default.init_r, default.target_r) == (12, 8)
    assert sorted(p.split("/", 2)[2] for p in default.plan(model.param_shapes())
                  if "layer_0" in p) == ["attn/query/kernel", "attn/value/kernel"]
    # An exclusion can precede a broad rule; lists from a config file work.
    ruled = AdaLoRA(targets=[[r".*/layer_1/.*", False], r"encoder/.*/attn/key/kernel"])
    assert list(ruled.plan(model.param_shapes())) == ["encoder/layer_0/attn/key/kernel"]
    # total_step comes from the run when not given.
    context = methods.Context(types.SimpleNamespace(train={"steps": 77}), model, None, None,
                              None)
    assert AdaLoRA().prepare(context).total_step == 77
    assert AdaLoRA(total_step=9).prepare(context).total_step == 9


def test_fresh_leaves_leave_outputs_unchanged(tiny):
    model, params = tiny
    method = AdaLoRA(targets=WIDE, init_r=6, target_r=2, total_step=10)
    adapted = method.init(jax.random.key(0), params)
    flat = tree.flatten(adapted)
    assert all(np.all(np.asarray(v) == 0) for p, v in flat.items() if p.endswith("adalora_e"))
    factors = np.concatenate([np.asarray(v).ravel() for p, v in flat.items()
                              if p.endswith(("adalora_a", "adalora_b"))])
    assert abs(factors.std() - 0.02) < 2e-3 and abs(factors.mean()) < 2e-3  # N(0, 0.02²)
    ids, mask, types_ = token_batch()
    for x, y in zip(forward(model, None, params, ids, mask, types_),
                    forward(model, method, adapted, ids, mask, types_)):
        assert gap(x, y) < 1e-6


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic=True):
        del deterministic
        return nn.Dense(3, name="wo")(jax.nn.relu(nn.Dense(5, name="wi")(x)))


def test_one_layer_and_the_regulariser_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32),
                          jax.eval_shape(TwoDense().init, jax.random.key(0), x)["params"])
    method = AdaLoRA(targets=(r"w(i|o)/kernel",), init_r=2, target_r=1, total_step=5,
                     alpha=3.0, orth_reg_weight=0.7)
    adapted = randomize_leaves(method.init(jax.random.key(1), params))
    f = {p: np.asarray(v, np.float64) for p, v in tree.flatten(adapted).items()}
    scale = 3.0 / (2 + 1e-5)

    def layer(name, h):
        update = f[f"{name}/adalora_a"] @ np.diag(f[f"{name}/adalora_e"]) @ f[f"{name}/adalora_b"]
        return h @ f[f"{name}/kernel"] + f[f"{name}/bias"] + scale * (h @ update)
    want = layer("wo", np.maximum(layer("wi", x), 0))
    applied = method.apply(TwoDense(), {"params": adapted}, x, deterministic=False)
    assert gap(applied.outputs, want) < 1e-5
    # PEFT's regulariser: the Frobenius norm (not squared) of AAᵀ−I and BᵀB−I, mean over all.
    norms = [np.linalg.norm(m - np.eye(2)) for name in ("wi", "wo")
             for m in (f[f"{name}/adalora_a"].T @ f[f"{name}/adalora_a"],
                       f[f"{name}/adalora_b"] @ f[f"{name}/adalora_b"].T)]
    assert abs(float(applied.losses["adalora_orth"]) - 0.7 * np.mean(norms)) < 1e-5
    assert float(applied.metrics["adalora_rank"]) == 2.0
    assert method.apply(TwoDense(), {"params": adapted}, x).losses == {}  # training only

    exported = method.export(adapted)
    assert set(tree.flatten(exported)) == set(tree.flatten(params))
    assert gap(TwoDense().apply({"params": exported}, x), want) < 1e-5


def test_export_folds_the_update_into_the_plain_model(tiny):
    model, params = tiny
    ids, mask, types_ = token_batch()
    method = AdaLoRA(targets=WIDE, init_r=4, target_r=2, total_step=10)
    adapted = randomize_leaves(method.init(jax.random.key(0), params))
    ours = forward(model, method, adapted, ids, mask, types_)
    exported = method.export(adapted)
    tree.check_same_structure(exported, params)
    plain = forward(model, None, exported, ids, mask, types_)
    assert gap(ours[0], plain[0]) < 1e-5 and gap(ours[1], plain[1]) < 1e-5
    assert gap(ours[0], forward(model, None, params, ids, mask, types_)[0]) > 1e-2


# ---------------------------------------------------------------------------------------------
# The rank allocator against PEFT's
# ---------------------------------------------------------------------------------------------


def _peft_schedule(**config):
    """PEFT's RankAllocator over ``targets`` fake matrices, for its budget schedule alone."""
    import peft
    import torch

    targets = config.pop("targets")
    fake = types.SimpleNamespace(named_parameters=lambda: [
        (f"m{i}.lora_A.default", torch.zeros(config["init_r"], 1)) for i in range(targets)])
    return peft.tuners.adalora.RankAllocator(
        fake, peft.AdaLoraConfig(target_modules=["m"], **config), "default")


def test_budget_is_peft_schedule():
    cases = [dict(targets=8, init_r=3, target_r=1, tinit=2, tfinal=3, deltaT=2, total_step=12),
             dict(targets=72, init_r=12, target_r=8, tinit=200, tfinal=1000, deltaT=10,
                  total_step=3000),
             # (12-9)·9 = 27 at a third of the way: the cubic is an integer exactly there,
             # where float32 would floor to one less than PEFT's float64.
             dict(targets=9, init_r=12, target_r=9, tinit=0, tfinal=0, deltaT=1, total_step=3)]
    for case in cases:
        allocator = _peft_schedule(**case)
        method = AdaLoRA(init_r=case["init_r"], target_r=case["target_r"], tinit=case["tinit"],
                         tfinal=case["tfinal"], delta_t=case["deltaT"],
                         total_step=case["total_step"])
        table = np.asarray(method.budget_table(case["targets"]))
        for step in range(case["total_step"] + 2):
            budget, _ = allocator.budget_schedule(step)
            assert method.budget(step, case["targets"]) == budget, (case, step)
            if step < table.size:
                assert table[step] == budget, (case, step)


def _hf_layouts(model, paths):
    """``{our A/E/B path: (torch parameter name, to torch, from torch)}``."""
    fmt = hf.FORMATS[model.family]
    out = {}
    for path in paths:
        module, leaf = path.rpartition("/")[0], path.rpartition("/")[2]
        name, layout = fmt.hf_name(f"{module}/kernel", "")
        torch_module = name[: -len(".weight")]
        convert = {adalora_lib.A: (layout.to_hf, "lora_A"),
                   adalora_lib.E: (lambda v: v.reshape(-1, 1), "lora_E"),
                   adalora_lib.B: (hf.linear(1).to_hf, "lora_B")}[leaf]
        out[path] = (f"{torch_module}.{convert[1]}.default", convert[0])
    return out


def test_allocator_matches_peft_rank_allocator(tiny):
    """The defining property: the same params and gradients, step by step through warmup,
    budgeting (every other step), the final allocation and the fixed pattern after it, give
    PEFT's sensitivity and uncertainty averages, its masked singular values and its rank
    pattern."""
    import peft
    import torch
    import transformers

    model, params = tiny
    torch.manual_seed(0)
    torch_model = peft.get_peft_model(
        transformers.BertModel(transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=32)),
        peft.AdaLoraConfig(target_modules=PEFT_WIDE, **PEFT_SCHEDULE))
    allocator = torch_model.base_model.rankallocator
    torch_params = dict(torch_model.base_model.model.named_parameters())

    method = AdaLoRA(targets=WIDE, **SCHEDULE)
    adapted = randomize_leaves(method.init(jax.random.key(0), params))
    trainable = {p: np.asarray(v) for p, v in tree.flatten(adapted).items() if "adalora_" in p}
    names = _hf_layouts(model, trainable)
    assert set(n for n, _ in names.values()) == {n for n in torch_params if "lora_" in n}
    state = method.init_state(tree.unflatten(trainable))
    step_fn = jax.jit(method.after_update)
    rng = np.random.default_rng(3)
    end = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    masked_steps = []
    for step in range(SCHEDULE["total_step"] + 1):
        # An "optimizer step" moves every leaf (masked singular values revive, as with Adam).
        trainable = {p: (v + rng.normal(0.0, 0.05, v.shape)).astype(np.float32)
                     for p, v in trainable.items()}
        grads = {p: rng.normal(0.0, 1.0, v.shape).astype(np.float32)
                 for p, v in trainable.items()}
        with torch.no_grad():
            for path, (name, to_torch) in names.items():
                torch_params[name].copy_(torch.from_numpy(np.array(to_torch(trainable[path]))))
                torch_params[name].grad = torch.from_numpy(np.array(to_torch(grads[path])))
        torch_model.base_model.update_and_allocate(step)

        new, state = step_fn(state, tree.unflatten(trainable), tree.unflatten(grads),
                             jnp.int32(step))
        new = {p: np.asarray(v) for p, v in tree.flatten(new).items()}
        sensitivity = tree.flatten(state["sensitivity"])
        uncertainty = tree.flatten(state["uncertainty"])
        for path, (name, to_torch) in names.items():
            theirs = torch_params[name].detach().numpy()
            np.testing.assert_allclose(np.asarray(to_torch(new[path])), theirs, rtol=1e-6,
                                       atol=0, err_msg=f"{path} at step {step}")
            if step < end:
                for ours, their_average in ((sensitivity, allocator.exp_avg_ipt),
                                            (uncertainty, allocator.exp_avg_unc)):
                    np.testing.assert_allclose(np.asarray(to_torch(ours[path])),
                                               their_average[name].numpy(), rtol=2e-5,
                                               atol=1e-9, err_msg=f"{path} at step {step}")
            else:  # the final allocation spent them (PEFT: reset_ipt)
                assert not allocator.exp_avg_ipt and not np.any(np.asarray(sensitivity[path]))
        kept = adalora_lib.rank_pattern(state)
        nonzero = sum(int(np.count_nonzero(new[p])) for p in kept)
        zeros = sum(int(np.sum(~k)) for k in kept.values())
        if zeros:
            masked_steps.append(step)
        if torch_model.peft_config["default"].rank_pattern:
            pattern = torch_model.peft_config["default"].rank_pattern
            assert {names[p][0]: k.tolist() for p, k in kept.items()} == pattern, step
        trainable = new
    # Budgeting at steps 4, 6 and 8 (every other step after tinit=2), the final allocation at
    # step 9 and its pattern applied again at 10, 11 and 12.
    assert masked_steps == [4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert nonzero == 8 * SCHEDULE["target_r"] == int(sum(k.sum() for k in kept.values()))


# ---------------------------------------------------------------------------------------------
# Under the training loop
# ---------------------------------------------------------------------------------------------


def adalora_config(**method):
    """The shared tiny loop config with AdaLoRA and 7 steps (the budget's schedule needs them)."""
    config = loop_config(dict(name="adalora", **method))
    config.train.steps = 7
    return config


def test_training_under_the_loop_follows_the_budget(tmp_path):
    """4 targets at init_r=3 (12 singular values) fall to target_r=1 (4): all train through
    tinit=1, the cubic budget masks the rest at every step of 2..4, then the final pattern."""
    config = adalora_config(targets=(r"encoder/.*/attn/(query|value|out)/kernel",
                                  r"encoder/.*/mlp/wo/kernel"),
                         init_r=3, target_r=1, tinit=1, tfinal=2, also_train=(r"classifier/.*",))
    setup = loop.make_setup(config, loop.build_model(config), 7, devices=jax.devices()[:1])
    assert setup.method.total_step == 7  # from config.train.steps
    assert set(setup.abstract_state) == {"step", "rng", "trainable", "frozen", "opt_state",
                                         "method_state"}
    state = loop.init_state(config, setup)
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    assert {p for p in trainable if not p.startswith("classifier/")} == {
        f"encoder/layer_0/{m}/adalora_{x}" for m in ("attn/query", "attn/value", "attn/out",
                                                     "mlp/wo") for x in "aeb"}
    batch = random_batch(setup)
    step = loop.make_train_step(setup)
    nonzero = []
    for index in range(7):
        state, sums = step(state, batch)
        values = tree.flatten(jax.device_get(state["trainable"]))
        nonzero.append(sum(int(np.count_nonzero(v)) for p, v in values.items()
                           if p.endswith("adalora_e")))
        if index == 0:  # before any mask: every trainable leaf moved
            for path, value in trainable.items():
                assert np.abs(values[path] - value).max() > 0, path
    budgets = [setup.method.budget(s, 4) for s in range(7)]
    assert budgets == [12, 12, 7, 5, 4, 4, 4]
    assert nonzero == budgets
    assert float(sums["adalora_orth"]) > 0 and float(sums["adalora_rank"]) > 0

    after = jax.device_get(state)
    for path, value in tree.flatten(before["frozen"]).items():
        np.testing.assert_array_equal(tree.flatten(after["frozen"])[path], value, err_msg=path)
    kept = adalora_lib.rank_pattern(after["method_state"])
    assert sum(int(k.sum()) for k in kept.values()) == 4

    # The method's state checkpoints and restores with the run.
    manager = checkpoint.make_manager(str(tmp_path), async_save=False)
    checkpoint.save(manager, 7, state, None, force=True)
    _, restored, _ = checkpoint.restore_latest(manager, setup.abstract_state)
    manager.close()
    for path, value in tree.flatten(jax.device_get(restored["method_state"])).items():
        np.testing.assert_array_equal(value, tree.flatten(after["method_state"])[path])

    # Every other method's train state is as before: no method_state key.
    plain = adalora_config()
    plain.method = dict(name="lora", targets=((r"encoder/.*/attn/query/kernel", 2),))
    lora_setup = loop.make_setup(plain, loop.build_model(plain), 7, devices=jax.devices()[:1])
    assert set(lora_setup.abstract_state) == {"step", "rng", "trainable", "frozen", "opt_state"}


def test_config_file_builds_an_adalora_method():
    from configs import minilm_adalora

    for arg, steps in (("quick", 4), (None, 250)):
        config = minilm_adalora.get_config(arg)
        assert config.train.steps == steps
        method = methods.build(config.method)
        assert isinstance(method, AdaLoRA)
        context = methods.Context(config, None, None, None, None)
        assert method.prepare(context).total_step == steps
    shapes = models.build("minilm_l6_classifier", num_classes=2).param_shapes()
    assert len(method.plan(shapes)) == 6 * 6


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_a_one_line_error(tiny, tmp_path):
    model, params = tiny
    cases = [
        (dict(init_r=4, target_r=6), r"AdaLoRA target_r=6 > init_r=4: AdaLoRA with a target "
                                     r"budget above the initial rank"),
        (dict(tinit=5, tfinal=5, total_step=10), r"AdaLoRA tinit=5 \+ tfinal=5 >= "
                                                 r"total_step=10: no step is left"),
        (dict(delta_t=0), r"AdaLoRA delta_t=0 is not an integer >= 1"),
        (dict(beta1=1.0), r"AdaLoRA beta1=1.0 is not in \(0, 1\)"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            AdaLoRA(**options)
        one_line(info)
    with pytest.raises(ValueError, match=r"AdaLoRA target rule 'encoder/.*/kernal' matches no "
                                         r"parameter; closest: encoder/") as info:
        AdaLoRA(targets=(r"encoder/.*/kernal",)).plan(params)
    one_line(info)
    with pytest.raises(ValueError, match="config.method for 'adalora'.*rank"):
        methods.build(dict(name="adalora", rank=4))
    context = methods.Context(None, model, None, None, None)
    with pytest.raises(ValueError, match=r"AdaLoRA needs total_step \(config.method.total_step"):
        AdaLoRA().prepare(context)
    method = AdaLoRA(total_step=10)
    adapted = method.init(jax.random.key(0), params)
    frozen_e = {p: v for p, v in tree.flatten(adapted).items()
                if "adalora_" in p and not p.endswith("layer_0/attn/query/adalora_a")}
    with pytest.raises(ValueError, match=r"AdaLoRA leaf encoder/layer_0/attn/query/adalora_e "
                                         r"has no encoder/layer_0/attn/query/adalora_a") as info:
        method.init_state(tree.unflatten(frozen_e))
    one_line(info)

    adalora_lib.export_adalora_peft(method, adapted, model, str(tmp_path / "b"))
    config_path = tmp_path / "b" / peft_format.ADAPTER_CONFIG
    config = json.load(open(config_path))
    json.dump({**config, "peft_type": "LORA"}, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"b/adapter_config.json: peft_type='LORA'; only "
                                         r"'ADALORA' adapters import here") as info:
        adalora_lib.import_adalora_peft(str(tmp_path / "b"), model, params)
    one_line(info)
    json.dump(config, open(config_path, "w"))
    wider = tiny_model(hidden_size=48)
    with pytest.raises(ValueError, match=r"adapter module 'encoder.layer.0.attention.self.query'"
                                         r": lora_A \(at init_r\) \(12, 32\) does not fit this "
                                         r"model's encoder/layer_0/attn/query/kernel \(48, 4, 12\)"
                                         ) as info:
        adalora_lib.import_adalora_peft(str(tmp_path / "b"), wider, random_params(wider))
    one_line(info)
    with pytest.raises(FileNotFoundError, match=r"nowhere/adapter_config.json does not exist"):
        adalora_lib.import_adalora_peft(str(tmp_path / "nowhere"), model, params)


# ---------------------------------------------------------------------------------------------
# PEFT interop, against peft in PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_side(tmp_path_factory, tiny):
    return save_torch_base(tmp_path_factory, *tiny, "peft_adalora")


def test_exported_adapter_matches_peft_in_torch(tiny, torch_side, tmp_path):
    """A trained-looking adapter: random leaves, a rank pattern that drops some singular
    values (zero in E, as training leaves them), the pooler trained whole."""
    import peft
    import transformers

    model, params = tiny
    method = AdaLoRA(targets=WIDE, init_r=4, target_r=2, total_step=20, alpha=6.0,
                     also_train=(r"pooler/.*",))
    adapted = randomize_leaves(method.init(jax.random.key(0), params))
    adapted = tree.map_with_path(lambda p, x: x + 0.5 if p.startswith("pooler/") else x, adapted)
    rng = np.random.default_rng(5)
    pattern = {p: rng.random(4) < 0.5 for p in tree.flatten(adapted) if p.endswith("adalora_e")}
    pattern["encoder/layer_1/mlp/wi/adalora_e"][:] = False  # a matrix left with rank 0
    adapted = tree.map_with_path(lambda p, x: x * pattern[p] if p in pattern else x, adapted)
    saved = adalora_lib.export_adalora_peft(method, adapted, model, str(tmp_path / "adapter"),
                                            rank_pattern=pattern,
                                            base_model_name_or_path=torch_side)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    assert json.load(open(tmp_path / "adapter" / peft_format.ADAPTER_CONFIG)) == saved
    key = "encoder.layer.0.attention.self.query.lora_E"
    assert saved["rank_pattern"][key] == pattern["encoder/layer_0/attn/query/adalora_e"].tolist()
    assert saved["modules_to_save"] == ["pooler.dense"]

    base = transformers.BertModel.from_pretrained(torch_side)
    torch_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    query = torch_model.base_model.model.encoder.layer[0].attention.self.query
    kept = int(pattern["encoder/layer_0/attn/query/adalora_e"].sum())
    assert tuple(query.lora_A["default"].shape) == (kept, 32)
    assert float(query.ranknum["default"]) == 4.0  # the scale stays alpha / init_r
    ids, mask, types_ = token_batch()
    theirs = torch_bert_outputs(torch_model, ids, mask, types_)
    ours = forward(model, method, adapted, ids, mask, types_)
    assert gap(ours[0], theirs[0]) < 1e-4 and gap(ours[1], theirs[1]) < 1e-4

    # ...and it reads back into the same function, dropped triplets as zeros.
    again_method, again = adalora_lib.import_adalora_peft(str(tmp_path / "adapter"), model,
                                                          params)
    assert (again_method.init_r, again_method.target_r, again_method.total_step,
            again_method.alpha) == (4, 2, 20, 6.0)
    assert again_method.also_train == ("pooler/bias", "pooler/kernel")
    flat_again, flat = tree.flatten(again), tree.flatten(adapted)
    assert set(flat_again) == set(flat)
    for path, kept_flags in pattern.items():
        np.testing.assert_allclose(flat_again[path], flat[path], atol=1e-7, err_msg=path)
        a_path = path.replace("adalora_e", "adalora_a")
        assert not np.any(np.asarray(flat_again[a_path])[..., ~kept_flags])
    again_out = forward(model, again_method, again, ids, mask, types_)
    assert gap(again_out[0], ours[0]) < 1e-5


def test_peft_created_adapter_imports(tiny, torch_side, tmp_path):
    """PEFT's own adapter after its final allocation: random leaves in torch, one update of
    the averages from random gradients, the forced mask at ``total_step - tfinal``, saved
    (kept triplets only, with ``rank_pattern``)."""
    import peft
    import torch
    import transformers

    model, params = tiny
    torch.manual_seed(0)
    base = transformers.BertModel.from_pretrained(torch_side)
    torch_model = peft.get_peft_model(base, peft.AdaLoraConfig(
        target_modules=PEFT_WIDE, init_r=4, target_r=2, total_step=10, tfinal=2,
        lora_alpha=12))
    for name, param in torch_model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                param.normal_(0.0, 0.5)
            param.grad = torch.randn_like(param)
    torch_model.base_model.update_and_allocate(0)
    torch_model.base_model.update_and_allocate(8)  # total_step - tfinal: the final mask
    torch_model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.load(open(tmp_path / "adapter" / peft_format.ADAPTER_CONFIG))
    assert sum(sum(flags) for flags in saved["rank_pattern"].values()) == 2 * 8
    torch_model.eval()
    ids, mask, types_ = token_batch(seed=1)
    theirs = torch_bert_outputs(torch_model, ids, mask, types_)

    method, adapted = adalora_lib.import_adalora_peft(str(tmp_path / "adapter"), model, params)
    assert sorted(method.plan(adapted)) == sorted(
        f"encoder/layer_{i}/{m}/kernel" for i in range(2)
        for m in ("attn/query", "attn/value", "attn/out", "mlp/wi"))
    flat = tree.flatten(adapted)
    assert sum(int(np.count_nonzero(v)) for p, v in flat.items() if p.endswith("adalora_e")) \
        == 2 * 8
    ours = forward(model, method, adapted, ids, mask, types_)
    assert gap(ours[0], theirs[0]) < 1e-4 and gap(ours[1], theirs[1]) < 1e-4
    plain = forward(model, None, method.export(adapted), ids, mask, types_)
    assert gap(plain[0], theirs[0]) < 1e-4
