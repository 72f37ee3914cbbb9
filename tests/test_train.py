"""The training loop on 8 fake CPU devices: layouts follow the rules, the sharded step equals
the single-device step, accumulation equals one big batch, frozen leaves carry no state, and
runs resume from orbax checkpoints exactly."""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from research import methods, tree
from research.lowrank import lora as lora_lib
from research.train import checkpoint, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train):
    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.data.options = dict(max_length=16)
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = dict(num_classes=2, vocab_size=30522, hidden_size=32, num_heads=4,
                                  mlp_dim=64, num_layers=2, hidden_dropout=0.0,
                                  attention_dropout=0.0)
    config.train.batch_size = 8
    config.train.steps = 3
    config.optim.learning_rate = 1e-3
    config.optim.schedule = "constant"
    config.train.update(train)
    return config


def random_batch(setup, rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    batch = {"input_ids": rng.integers(1000, 30000, (rows, length)).astype(np.int32),
             "attention_mask": (np.arange(length) < rng.integers(4, length, (rows, 1))).astype(np.int32),
             "token_type_ids": np.zeros((rows, length), np.int32),
             "label": rng.integers(0, 2, (rows,)).astype(np.int32)}
    return loop.global_batch(setup, batch)


def run_steps(config, mesh, devices, steps=2, grad_accum=1):
    config.mesh = mesh
    setup = loop.make_setup(config, loop.build_model(config), 10, devices=devices)
    state = loop.init_state(config, setup)
    step = loop.make_train_step(setup, grad_accum)
    for index in range(steps):
        state, _ = step(state, random_batch(setup, seed=index))
    return setup, jax.device_get(state["trainable"])


def test_parameters_are_laid_out_as_the_rules_say():
    config = tiny_config()
    config.mesh = dict(fsdp=4, tensor=2)
    setup = loop.make_setup(config, loop.build_model(config), 10)
    state = loop.init_state(config, setup)
    params = tree.flatten(state["trainable"])
    kernel = params["encoder/layer_0/attn/query/kernel"]  # [embed, heads, head_dim]
    assert kernel.sharding.spec == P("fsdp", "tensor", None)
    assert kernel.addressable_shards[0].data.shape == (32 // 4, 4 // 2, 8)
    wi = params["encoder/layer_0/mlp/wi/kernel"]  # [embed, mlp]
    assert wi.sharding.spec == P("fsdp", "tensor")
    assert wi.addressable_shards[0].data.shape == (8, 32)
    word = params["embeddings/word/embedding"]  # [vocab, embed]
    assert word.sharding.spec == P("tensor", "fsdp")
    classifier = params["classifier/kernel"]  # [embed, classes]: 'classes' has no rule
    assert classifier.sharding.spec == P("fsdp", None)
    # Adam's moments live where their parameter lives.
    mu = tree.flatten(state["opt_state"][1].mu)["encoder/layer_0/mlp/wi/kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")


def test_sharded_step_equals_single_device_step():
    _, single = run_steps(tiny_config(), dict(data=1), jax.devices()[:1])
    _, sharded = run_steps(tiny_config(), dict(data=2, fsdp=2, tensor=2), jax.devices())
    chex.assert_trees_all_close(sharded, single, atol=2e-5, rtol=2e-5)


def test_gradient_accumulation_equals_one_big_batch():
    _, whole = run_steps(tiny_config(), dict(data=1), jax.devices()[:1], steps=1)
    _, accumulated = run_steps(tiny_config(), dict(data=1), jax.devices()[:1], steps=1,
                               grad_accum=2)
    chex.assert_trees_all_close(accumulated, whole, atol=2e-6)


def test_frozen_leaves_get_no_gradient_or_optimizer_state():
    config = tiny_config()
    config.optim.frozen = ("embeddings/.*", "encoder/.*")
    config.mesh = dict(data=1)
    setup = loop.make_setup(config, loop.build_model(config), 10, devices=jax.devices()[:1])
    state = loop.init_state(config, setup)
    assert set(tree.flatten(state["trainable"])) == {"pooler/kernel", "pooler/bias",
                                                     "classifier/kernel", "classifier/bias"}
    frozen_before = jax.device_get(state["frozen"])
    step = loop.make_train_step(setup)
    compiled = step.lower(setup.abstract_state, random_batch(setup)).compile()
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"]))
    trainable_bytes = sum(x.size * 4 for x in jax.tree.leaves(state["trainable"]))
    assert opt_bytes <= 2 * trainable_bytes + 64  # Adam: two moments of the trainable part only
    state, _ = compiled(state, random_batch(setup))
    chex.assert_trees_all_equal(jax.device_get(state["frozen"]), frozen_before)


def test_bf16_compute_runs_with_float32_params():
    config = tiny_config()
    config.model.overrides["dtype"] = "bfloat16"
    setup, params = run_steps(config, dict(data=1), jax.devices()[:1], steps=1)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


# --- Whole runs on real data -------------------------------------------------------------------


def final_params(workdir):
    manager = checkpoint.make_manager(workdir)
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return step, restored["state"]["trainable"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def test_resume_continues_exactly_where_it_stopped(tmp_path, data_dir):
    def config(steps):
        c = tiny_config(steps=steps, log_every=1, final_eval_splits=("validation",))
        c.data.data_dir = data_dir
        c.checkpoint.every = 2
        return c

    loop.train(config(4), str(tmp_path / "straight"))
    loop.train(config(2), str(tmp_path / "resumed"))
    results = loop.train(config(4), str(tmp_path / "resumed"))  # picks up at step 2
    assert 0.0 <= results["validation/accuracy"] <= 1.0
    (step_a, a), (step_b, b) = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert step_a == step_b == 4
    chex.assert_trees_all_equal(a, b)
    lines = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [l["step"] for l in lines if "train/loss" in l] == [1, 2, 3, 4]
    assert os.listdir(tmp_path / "resumed" / "tensorboard")


def test_a_run_starts_from_another_runs_final_params(tmp_path, data_dir):
    first = tiny_config(steps=2, final_eval_splits=())
    first.data.data_dir = data_dir
    loop.train(first, str(tmp_path))
    saved = jax.device_get(checkpoint.final_params(str(tmp_path)))

    def start(**overrides):
        config = tiny_config(steps=2)
        config.model.init_from = str(tmp_path)
        config.model.overrides.update(overrides)
        setup = loop.make_setup(config, loop.build_model(config), 2, devices=jax.devices()[:1])
        return jax.device_get(loop.init_params(config, setup, loop.init_key(config)))

    chex.assert_trees_all_equal(start(), saved)
    with pytest.raises(ValueError, match=r"mlp/wi/(bias|kernel)' has shape") as info:
        start(mlp_dim=128)
    assert "\n" not in str(info.value)


def test_init_from_reads_a_run_through_its_methods_export(tmp_path, data_dir):
    """A LoRA run starts the next run as its merged model (not its base); a prompt, which
    cannot fold, starts the next run's prompt of the same shape (PVP's progressive prompts)."""
    def run(name, workdir, init_from="", **method):
        config = tiny_config(steps=2, final_eval_splits=())
        config.data.data_dir = data_dir
        config.method = dict(name=name, **method)
        config.model.init_from = init_from
        loop.train(config, str(workdir))
        return config

    lora = dict(targets=((r"encoder/.*/attn/query/kernel", 2),), alpha=8.0)
    run("lora", tmp_path / "lora", **lora)
    saved = jax.device_get(checkpoint.final_params(str(tmp_path / "lora")))
    merged = lora_lib.merge(saved, lora_lib.LoRA(**lora))

    def start(config):
        setup = loop.make_setup(config, loop.build_model(config), 2, devices=jax.devices()[:1])
        return jax.device_get(loop.init_params(config, setup, loop.init_key(config)))

    config = tiny_config(steps=2)
    config.model.init_from = str(tmp_path / "lora")
    chex.assert_trees_all_close(start(config), merged, atol=1e-6)
    kernel = "encoder/layer_0/attn/query/kernel"
    assert not np.allclose(tree.flatten(merged)[kernel], tree.flatten(saved)[kernel])

    dept = dict(prompt_length=3, rank=2)
    run("dept", tmp_path / "dept", **dept)
    prompt = tree.flatten(checkpoint.final_params(str(tmp_path / "dept")))["embeddings/prompt"]
    config = tiny_config(steps=2)
    config.model.init_from = str(tmp_path / "dept")
    config.method = dict(name="dept", **dept)
    np.testing.assert_array_equal(tree.flatten(start(config))["embeddings/prompt"], prompt)


def test_checkpoint_of_a_different_model_is_a_one_line_error(tmp_path, data_dir):
    config = tiny_config(steps=2, final_eval_splits=())
    config.data.data_dir = data_dir
    loop.train(config, str(tmp_path))
    config.model.overrides["mlp_dim"] = 48
    with pytest.raises(ValueError, match=r"'trainable/encoder/layer_0/mlp/wi/bias' has shape "
                                         r"\(64,\), the model expects \(48,\)"):
        loop.train(config, str(tmp_path))


def cli(*args, **kwargs):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "launch.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--config.train.stepz=3"], "unknown config key 'train.stepz'; did you mean train.steps?"),
    (["--config.data.name=imagenet"], "dataset 'imagenet'"),
    (["--config.model.name=bert_huge_classifier"], "unknown model 'bert_huge_classifier'"),
    (["--config.model.pretrained=/nonexistent"], "/nonexistent"),
    (["--config.optim.frozen=('embedings/.*',)"], "frozen rule 'embedings/.*' matches no parameter"),
])
def test_cli_user_errors_are_one_line(tmp_path, args, message):
    result = cli("--config", "configs/minilm_rotten_tomatoes.py:quick", "--workdir",
                 str(tmp_path), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_one_line(tmp_path):
    result = cli("--config", "configs/nope.py", "--workdir", str(tmp_path))
    assert result.returncode == 2 and "error: config file 'configs/nope.py' does not exist" in result.stderr


@dataclasses.dataclass(frozen=True)
class CalibratedPenalty(methods.Method):
    """A toy method using both extension points of the seam: its leaf starts at the mean token
    id of the first two training batches, and a penalty ``0.5·offset²`` is its loss term."""
    calibration_batches: int = 2

    def calibrate(self, module, params, batches):
        return jnp.mean(batches["input_ids"].astype(jnp.float32))

    def init(self, rng, params, stats=None):
        return {**params, "offset": jnp.full((), stats, jnp.float32)}

    def logical_axes(self, logical, shapes):
        return {**logical, "offset": ()}

    def apply(self, module, variables, *args, **kwargs):
        return methods.Applied(module.apply(variables, *args, **kwargs), {
            "penalty": 0.5 * variables["params"]["offset"] ** 2})


def test_a_method_can_calibrate_on_training_batches_and_add_a_loss_term(monkeypatch, data_dir):
    monkeypatch.setitem(methods._REGISTRY, "calibrated_penalty", CalibratedPenalty)
    config = tiny_config(steps=1)
    config.data.data_dir = data_dir
    config.method = dict(name="calibrated_penalty", trainable=("offset",))
    config.optim.update(name="sgd", momentum=0.0, learning_rate=0.1, grad_clip_norm=0.0)
    setup = loop.make_setup(config, loop.build_model(config), 1)
    state = loop.init_state(config, setup)

    loader = iter(loop.make_loader(config, "train", training=True, batch_size=8))
    expected = np.mean([next(loader)["input_ids"] for _ in range(2)])
    np.testing.assert_allclose(state["trainable"]["offset"], expected, rtol=1e-4)

    new_state, sums = loop.make_train_step(setup)(state, random_batch(setup))
    # The penalty's gradient is the offset itself: SGD moves it by lr·offset.
    np.testing.assert_allclose(new_state["trainable"]["offset"], 0.9 * expected, rtol=1e-4)
    np.testing.assert_allclose(sums["penalty"] / sums["count"], 0.5 * expected ** 2, rtol=1e-4)


def test_step_key_draws_from_the_chosen_generator():
    key = jax.random.key(3)
    assert loop.step_key(key, "threefry2x32") is key
    fast = loop.step_key(key, "unsafe_rbg")
    assert jax.random.key_data(fast).shape == (4,)
    assert not np.array_equal(jax.random.key_data(loop.step_key(jax.random.key(4), "unsafe_rbg")),
                              jax.random.key_data(fast))
    with pytest.raises(ValueError, match=r"config.train.rng_impl='philox' is not one of"):
        loop.step_key(key, "philox")


def test_init_seed_shares_fresh_weights_across_seeds():
    """Soup ingredients: runs with different seeds but one ``model.init_seed`` draw their fresh
    weights from one key (and without it they do not); the default is unchanged."""
    def key(seed, init_seed):
        config = tiny_config()
        config.seed, config.model.init_seed = seed, init_seed
        return jax.random.key_data(loop.init_key(config))

    np.testing.assert_array_equal(key(1, 0), key(2, 0))
    assert not np.array_equal(key(1, None), key(2, None))
    np.testing.assert_array_equal(key(5, None), jax.random.key_data(
        jax.random.fold_in(jax.random.key(5), 0)))


def test_train_options_reach_the_training_loader_only(monkeypatch):
    seen = {}
    monkeypatch.setattr(loop.data_lib, "make_loader",
                        lambda name, split, **kwargs: seen.setdefault(split, kwargs))
    config = tiny_config()
    config.data.train_options = dict(shard_index=1, shard_count=3)
    loop.make_loader(config, "train", training=True, batch_size=8)
    loop.make_loader(config, "test", training=False, batch_size=8)
    assert seen["train"]["shard_count"] == 3 and seen["train"]["max_length"] == 16
    assert "shard_count" not in seen["test"] and seen["test"]["max_length"] == 16
