"""Adapters shared across tasks: Polyhistor and VL-Adapter's shared adapters, and the launcher
that trains both tasks in one run.

Polyhistor: one generated adapter matrix against numpy (hidden layer, two low-rank factors, a
Kronecker product with the site's kernel); the hyper-network's size grows with neither tasks
nor layers (only the embeddings and the small kernels do); the task id reaches the adapters
only through its embedding, and switching it switches adapters and head; fresh leaves change
nothing; the export is the task's model, run by plain Houlsby adapters; under the loop a step
on one task moves the shared hyper-network and that task's rows only. Shared adapters: one
adapter set and two heads; a step on task A changes the adapters task B then runs. Configs
build, the launcher trains two datasets in one run, bad input is a one-line error."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import methods, models, tree
from research.adapters import polyhistor as polyhistor_lib
from research.adapters.bottleneck import Bottleneck
from research.adapters.polyhistor import Polyhistor
from research.adapters.shared import SharedAdapter
from research.train import loop, optim
from tests.tiny_bert import forward, gap, loop_config, random_tree, token_batch

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0, num_classes=3)
TASKS = ("a", "b")
# d = 32, m = 32 / 8 = 4: templates 8 x 2, kernels 4 x 2.
POLY = dict(tasks=TASKS, reduction_factor=8, template=(8, 2), rank=2, embedding_dim=4,
            hidden_dim=6)
SITES = [f"encoder/layer_{i}/{site}" for i in (0, 1) for site in ("attn/out", "mlp/wo")]


def tiny_model(**overrides):
    return models.build("bert_tiny_classifier", **{**TINY, **overrides})


def randomize(params, pattern, seed=1, scale=0.5):
    """Every leaf whose path contains ``pattern`` drawn anew (kernels off zero)."""
    rng = np.random.default_rng(seed)
    return tree.map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0.0, scale, x.shape), jnp.float32)
        if pattern in p else x, params)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, random_tree(model.param_shapes())


@pytest.fixture(scope="module")
def poly(tiny):
    """A Polyhistor with every one of its leaves (heads too) drawn away from init."""
    model, base = tiny
    method = Polyhistor(**POLY)
    params = randomize(method.init(jax.random.key(0), base), "polyhistor/")
    params = randomize(params, "classifier/task_", seed=2)
    return method, params


# ---------------------------------------------------------------------------------------------
# Polyhistor
# ---------------------------------------------------------------------------------------------


def test_one_generated_matrix_against_numpy(poly):
    method, params = poly
    flat = {p: np.asarray(v) for p, v in tree.flatten(params).items()}
    h = {name: flat[f"polyhistor/{name}"] for name in (
        "task_embedding", "hidden_weights", "hidden_bias", "down_u", "down_v", "up_u", "up_v",
        "down_bias", "up_bias")}
    site, task = "encoder/layer_1/attn/out", 1
    own = f"{site}/polyhistor"
    code = np.maximum(np.concatenate([h["task_embedding"][task], flat[f"{own}/layer_embedding"]])
                      @ h["hidden_weights"] + h["hidden_bias"], 0.0)
    d_t, m_t, r = 8, 2, 2
    down = (code @ h["down_u"]).reshape(d_t, r) @ (code @ h["down_v"]).reshape(r, m_t)
    up = (code @ h["up_u"]).reshape(m_t, r) @ (code @ h["up_v"]).reshape(r, d_t)
    expected = {"down/kernel": np.kron(flat[f"{own}/down_scaling"], down),
                "up/kernel": np.kron(flat[f"{own}/up_scaling"], up),
                "down/bias": np.kron(flat[f"{own}/down_bias_scaling"], code @ h["down_bias"]),
                "up/bias": np.kron(flat[f"{own}/up_bias_scaling"], code @ h["up_bias"])}
    assert expected["down/kernel"].shape == (32, 4) and expected["up/kernel"].shape == (4, 32)
    generated = tree.flatten(method.for_task("b").adapters(params)[site])
    for leaf, value in expected.items():
        np.testing.assert_allclose(generated[leaf], value, rtol=1e-5, atol=1e-6, err_msg=leaf)
    exported = tree.flatten(method.for_task("b").export(params))
    np.testing.assert_allclose(exported[f"{site}/adapter/down/kernel"], expected["down/kernel"],
                               rtol=1e-5, atol=1e-6)


def test_the_hypernetwork_grows_with_neither_tasks_nor_layers(tiny):
    def own_shapes(tasks, layers):
        shapes = tiny_model(num_layers=layers).param_shapes()
        method = Polyhistor(**{**POLY, "tasks": tasks})
        added = tree.flatten(jax.eval_shape(method.init, jax.random.key(0), shapes))
        return {p: s.shape for p, s in added.items() if "polyhistor" in p}

    def split(shapes):
        hyper = {p: s for p, s in shapes.items()
                 if p.startswith("polyhistor/") and p != "polyhistor/task_embedding"}
        return hyper, shapes["polyhistor/task_embedding"], {
            p: s for p, s in shapes.items() if not p.startswith("polyhistor/")}

    hyper, tasks, per_site = split(own_shapes(("a", "b"), 2))
    for grown in (own_shapes(("a", "b", "c"), 2), own_shapes(("a", "b"), 3)):
        assert split(grown)[0] == hyper  # the same shared hyper-network
    assert tasks == (2, 4) and split(own_shapes(("a", "b", "c"), 2))[1] == (3, 4)
    # Per site: a 4-vector embedding and kernels (4 x 2, 2 x 4, 2, 4); one more layer adds two
    # sites of these and nothing else.
    assert len(per_site) == 4 * 5
    assert split(own_shapes(("a", "b"), 3))[2].keys() - per_site.keys() == {
        f"encoder/layer_2/{site}/polyhistor/{leaf}" for site in ("attn/out", "mlp/wo")
        for leaf in ("layer_embedding", *polyhistor_lib.SCALING_KERNELS)}
    assert per_site["encoder/layer_0/mlp/wo/polyhistor/down_scaling"] == (4, 2)
    assert per_site["encoder/layer_0/mlp/wo/polyhistor/up_scaling"] == (2, 4)


def test_the_task_id_switches_the_adapters_and_the_head(tiny, poly):
    model, _ = tiny
    method, params = poly
    inputs = token_batch()
    a, b = method.for_task("a"), method.for_task("b")
    adapters_a, adapters_b = a.adapters(params), b.adapters(params)
    for site in SITES:
        assert gap(adapters_a[site]["down"]["kernel"], adapters_b[site]["down"]["kernel"]) > 1e-3
    assert gap(forward(model, a, params, *inputs), forward(model, b, params, *inputs)) > 1e-3
    # The task enters only through its embedding and head: make b's equal to a's, and b runs a.
    flat = dict(tree.flatten(params))
    for path in ("polyhistor/task_embedding", "classifier/task_kernel", "classifier/task_bias"):
        flat[path] = flat[path].at[1].set(flat[path][0])
    same = tree.unflatten(flat)
    assert gap(forward(model, a, same, *inputs), forward(model, b, same, *inputs)) < 1e-6


def test_fresh_leaves_leave_every_task_unchanged(tiny):
    model, base = tiny
    method = Polyhistor(**POLY)
    params = method.init(jax.random.key(0), base)
    inputs = token_batch()
    plain = forward(model, None, base, *inputs)
    for task in TASKS:
        assert gap(forward(model, method.for_task(task), params, *inputs), plain) < 1e-6
    # ... though the down side is live: the first step has something to move.
    down = method.adapters(params)["encoder/layer_0/mlp/wo"]["down"]["kernel"]
    assert float(jnp.abs(down).max()) > 1e-4


def test_export_is_the_task_model_that_houlsby_adapters_run(tiny, poly):
    model, base = tiny
    method, params = poly
    inputs = token_batch()
    for task in TASKS:
        one = method.for_task(task)
        exported = one.export(params)
        extra = set(tree.flatten(exported)) - set(tree.flatten(base))
        assert extra == {f"{site}/adapter/{part}/{leaf}" for site in SITES
                         for part in ("down", "up") for leaf in ("kernel", "bias")}
        np.testing.assert_array_equal(exported["classifier"]["kernel"],
                                      params["classifier"]["task_kernel"][TASKS.index(task)])
        runner = one.as_adapters()
        assert isinstance(runner, Bottleneck)
        assert gap(forward(model, runner, exported, *inputs),
                   forward(model, one, params, *inputs)) < 1e-5


def _tiny_run_config(method: dict, data: str = "rotten_tomatoes/sentiment",
                     vocab_size: int = 1000):
    config = loop_config(method)
    config.data.name = data
    config.data.options = dict(max_length=16)
    config.model.overrides.vocab_size = vocab_size
    return config


def _batch(setup, seed=0):
    rng = np.random.default_rng(seed)
    return loop.global_batch(setup, {
        "input_ids": rng.integers(1, 1000, (8, 16)).astype(np.int32),
        "attention_mask": np.ones((8, 16), np.int32),
        "token_type_ids": np.zeros((8, 16), np.int32),
        "label": rng.integers(0, 2, (8,)).astype(np.int32)})


def test_steps_on_one_task_move_the_shared_network_and_that_task_only():
    config = _tiny_run_config(dict(name="polyhistor", **POLY, task="a"))
    setup = loop.make_setup(config, loop.build_model(config), 2, devices=jax.devices()[:1])
    state = loop.init_state(config, setup)
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    assert {p for p in trainable if not p.startswith("encoder/")} == {
        *(f"polyhistor/{leaf}" for leaf in ("task_embedding", "hidden_weights", "hidden_bias",
                                            "down_u", "down_v", "up_u", "up_v", "down_bias",
                                            "up_bias")),
        "classifier/task_kernel", "classifier/task_bias"}
    step = loop.make_train_step(setup)
    for seed in (0, 1):  # the first step moves the up-side kernels, the second the network
        state, _ = step(state, _batch(setup, seed))
    after = jax.device_get(state)
    for path, value in tree.flatten(before["frozen"]).items():
        np.testing.assert_array_equal(tree.flatten(after["frozen"])[path], value, err_msg=path)
    moved = tree.flatten(after["trainable"])
    for path, value in trainable.items():
        if path.startswith("polyhistor/") and path != "polyhistor/task_embedding":
            assert gap(moved[path], value) > 0, path
    for path in ("polyhistor/task_embedding", "classifier/task_kernel", "classifier/task_bias"):
        assert gap(moved[path][0], trainable[path][0]) > 0, path  # task a's row moved
        np.testing.assert_array_equal(moved[path][1], trainable[path][1], err_msg=path)


# ---------------------------------------------------------------------------------------------
# VL-Adapter: shared adapters, per-task heads
# ---------------------------------------------------------------------------------------------


def test_shared_adapters_are_one_set_with_a_head_per_task(tiny):
    model, base = tiny
    method = methods.build(dict(name="shared_adapter", tasks=TASKS))
    assert isinstance(method, SharedAdapter) and method.task == "a"
    params = method.init(jax.random.key(0), base)
    added = {p: v.shape for p, v in tree.flatten(params).items()
             if p not in tree.flatten(base)}
    adapters = {f"{site}/adapter/{part}/{leaf}" for site in SITES for part in ("down", "up")
                for leaf in ("kernel", "bias")}
    assert set(added) == adapters | {"classifier/task_kernel", "classifier/task_bias"}
    assert added["classifier/task_kernel"] == (2, 32, 3)
    trainable = optim.trainable_mask(params, (), method.trainable_for(params))
    assert {p for p, t in tree.flatten(trainable).items() if t} == set(added)
    inputs = token_batch()
    plain = forward(model, None, base, *inputs)
    assert gap(forward(model, method.for_task("b"), params, *inputs), plain) < 1e-6
    # Switching the task switches the head alone.
    moved = randomize(randomize(params, "/adapter/"), "classifier/task_", seed=2)
    a, b = method.for_task("a"), method.for_task("b")
    exported_a, exported_b = a.export(moved), b.export(moved)
    for path in adapters:
        np.testing.assert_array_equal(tree.flatten(exported_a)[path],
                                      tree.flatten(exported_b)[path])
    assert gap(exported_a["classifier"]["kernel"], exported_b["classifier"]["kernel"]) > 0
    assert gap(forward(model, b.as_adapters(), exported_b, *inputs),
               forward(model, b, moved, *inputs)) < 1e-5


def test_a_step_on_task_a_changes_the_adapters_task_b_uses():
    config = _tiny_run_config(dict(name="shared_adapter", tasks=TASKS, reduction_factor=8))
    model = loop.build_model(config)
    views = {}
    for task in TASKS:
        view = config.copy_and_resolve_references()
        view.method.task = task
        views[task] = loop.make_setup(view, model, 3, devices=jax.devices()[:1])
    state = loop.init_state(config, views["a"])
    before = jax.device_get(state)

    def outputs_of_b(state):
        params = tree.combine(state["trainable"], state["frozen"])
        return forward(model, views["b"].method, params,
                       *token_batch(vocab=1000))

    b_before = outputs_of_b(before)
    step = loop.make_train_step(views["a"])
    for seed in (0, 1):
        state, _ = step(state, _batch(views["a"], seed))
    after = jax.device_get(state)
    old, new = tree.flatten(before["trainable"]), tree.flatten(after["trainable"])
    for path in old:
        if "/adapter/" in path:
            assert gap(new[path], old[path]) > 0, path
    for path in ("classifier/task_kernel", "classifier/task_bias"):
        assert gap(new[path][0], old[path][0]) > 0, path
        np.testing.assert_array_equal(new[path][1], old[path][1], err_msg=path)
    # b's head did not move, yet b's outputs did: through the adapters a trained.
    assert gap(outputs_of_b(after), b_before) > 1e-4


# ---------------------------------------------------------------------------------------------
# Launcher and configs
# ---------------------------------------------------------------------------------------------


def test_the_launcher_trains_both_datasets_in_one_run(tmp_path):
    from launch import multitask

    config = _tiny_run_config(dict(name="shared_adapter", reduction_factor=8,
                                   tasks=("rotten_tomatoes/sentiment",
                                          "rotten_tomatoes/subjectivity")), data="",
                              vocab_size=30522)  # real batches: MiniLM's token ids
    config.train.steps = 4
    config.train.log_every = 2
    config.train.tensorboard = False
    config.train.final_eval_splits = ("validation",)
    config.data.options = dict(max_length=16, shard_index=0, shard_count=8)
    config.mesh = dict(data=-1)  # the launcher's setups take every device
    results = multitask.train(config, str(tmp_path))
    assert set(results) == {f"rotten_tomatoes/{task}/validation/{metric}"
                            for task in ("sentiment", "subjectivity")
                            for metric in ("loss", "accuracy")}
    with open(tmp_path / "metrics.jsonl") as file:
        logged = [json.loads(line) for line in file]
    assert {"train/rotten_tomatoes/sentiment/loss", "train/rotten_tomatoes/subjectivity/loss"
            } <= set(logged[0])
    with open(tmp_path / "method.json") as file:
        assert json.load(file)["task"] == "rotten_tomatoes/sentiment"
    # The run reads back as the first task's model: Houlsby adapters and its own head.
    exported = tree.flatten(loop.exported_params(str(tmp_path)))
    assert "encoder/layer_0/mlp/wo/adapter/up/kernel" in exported
    assert not any("task_" in path for path in exported)
    assert float(np.abs(exported["encoder/layer_0/mlp/wo/adapter/up/kernel"]).max()) > 0
    with pytest.raises(ValueError, match="already holds a run's checkpoints") as info:
        multitask.train(config, str(tmp_path))  # no resume, and nothing overwritten
    assert "\n" not in str(info.value)


def test_config_files_build_the_methods():
    from configs import minilm_polyhistor, minilm_shared_adapter

    shapes = models.build("minilm_l6_classifier", num_classes=2).param_shapes()
    for config_file, kind in ((minilm_polyhistor, Polyhistor),
                              (minilm_shared_adapter, SharedAdapter)):
        config = config_file.get_config("quick")
        method = methods.build(config.method)
        assert type(method) is kind and config.train.steps == 4
        assert method.tasks == ("rotten_tomatoes/sentiment", "rotten_tomatoes/subjectivity")
        assert config_file.get_config().train.steps == 500  # 250 per task
        added = tree.flatten(jax.eval_shape(method.init, jax.random.key(0), shapes))
        trainable = optim.trainable_mask(added, (), method.trainable_for(added))
        count = sum(int(np.prod(added[p].shape)) for p, t in tree.flatten(trainable).items()
                    if t and p not in tree.flatten(shapes))
        heads = 2 * (384 * 2 + 2)
        if kind is Polyhistor:  # hyper-network + 2 task and 12 site embeddings and kernels
            hyper = 64 * 64 + 64 + 64 * (32 * 4 + 4 * 6 + 6 * 4 + 4 * 32 + 6 + 32)
            assert count == hyper + 2 * 32 + 12 * (32 + 12 * 4 * 2 + 4 + 12) + heads == 29380
        else:  # one set of adapters (384 -> 48 -> 384) for both tasks
            assert count == 12 * (384 * 48 * 2 + 48 + 384) + heads


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_a_one_line_error(tiny, tmp_path):
    model, base = tiny
    cases = [
        (dict(name="polyhistor"), "config.method.tasks=()"),
        (dict(name="polyhistor", tasks=("a", "a")), "names a task twice"),
        (dict(name="polyhistor", tasks=TASKS, task="c"), "config.method.task='c' is not one"),
        (dict(name="polyhistor", tasks=TASKS, template=(8,)), "config.method.template=.*pair"),
        (dict(name="polyhistor", tasks=TASKS, rank=0), "config.method.rank=0"),
        (dict(name="polyhistor", tasks=TASKS, nonlinearity="elu"), "config.method.nonlinearity"),
        (dict(name="shared_adapter", tasks=("a", "")), "config.method.tasks="),
    ]
    for options, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            methods.build(options)
        assert "\n" not in str(info.value)
    bad_init = [
        (Polyhistor(**{**POLY, "template": (6, 2)}), r"template=\(6, 2\) does not divide the "
                                                     r"adapter at encoder/layer_0/attn/out"),
        (Polyhistor(**{**POLY, "head": "classifer"}), "config.method.head='classifer'.*classifier"),
        (SharedAdapter(tasks=TASKS, head="pooler/x"), "config.method.head='pooler/x'"),
    ]
    for method, match in bad_init:
        with pytest.raises(ValueError, match=match) as info:
            method.init(jax.random.key(0), base)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="polyhistor leaf polyhistor/task_embedding") as info:
        Polyhistor(**POLY).export(base)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"per-task head 'classifier/task_(kernel|bias)'") as info:
        SharedAdapter(tasks=TASKS).export(base)
    assert "\n" not in str(info.value)
    from launch import multitask

    config = _tiny_run_config(dict(name="houlsby"))
    with pytest.raises(ValueError, match="config.method.tasks is empty.*'houlsby'") as info:
        multitask.train(config, str(tmp_path))
    assert "\n" not in str(info.value)
    assert multitask.main(["--config", "configs/minilm_polyhistor.py:nope", "--workdir",
                           str(tmp_path)]) == 2
    assert not os.path.exists(tmp_path / "checkpoints")
