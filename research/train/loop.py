"""The training run, as functions a notebook can call one by one.

config -> data -> model (abstract shapes via ``jax.eval_shape``) -> trainable/frozen split ->
optimizer (frozen leaves get no state) -> shardings (logical-axis rules over a named mesh) ->
params created directly on their devices -> one jitted, donated update step -> orbax checkpoints
-> evaluation -> metrics. :func:`train` reads top to bottom as those sections.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from research import data as data_lib
from research import methods
from research import models
from research import tree as tree_lib
from research.models import hf
from research.train import banner, checkpoint, optim, preemption, sharding, tasks
from research.train.metrics import MetricWriter


# ---------------------------------------------------------------------------------------------
# Model: abstract shapes and logical axes
# ---------------------------------------------------------------------------------------------


# The engine's model keys: set as ``config.model.KEY`` (ModelConfig fields the loop decides,
# not the architecture), never inside ``overrides``.
ENGINE_KEYS = ("scan_layers", "remat", "attention_impl")


def build_model(config):
    """The zoo model named by ``config.model`` (a preset plus overrides and engine keys)."""
    overrides = dict(config.model.get("overrides", {}))
    for key in ENGINE_KEYS:
        if key in overrides:
            raise ValueError(f"config.model.overrides.{key}: set config.model.{key} instead")
        if key in config.model:
            overrides[key] = config.model[key]
    try:
        return models.build(config.model.name, **overrides)
    except ValueError as err:
        raise ValueError(f"config.model ({config.model.name}): {err}") from None


def abstract_params(model) -> tuple[dict, dict]:
    """``(ShapeDtypeStruct tree, logical-axis-name tree)`` without allocating anything."""
    logical = jax.tree.map(tuple, model.logical_axes(),
                           is_leaf=lambda x: isinstance(x, PartitionSpec))
    return model.param_shapes(), logical


# ---------------------------------------------------------------------------------------------
# State: trainable and frozen params, optimizer state, step, rng -- and where each leaf lives
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run, computed from config and abstract shapes only."""
    model: Any
    method: methods.Method
    mesh: jax.sharding.Mesh
    rules: tuple
    trainable: dict           # bool tree over all params
    tx: optax.GradientTransformation
    param_shardings: dict     # over all params
    state_shardings: dict     # over the train state
    abstract_state: dict      # ShapeDtypeStructs with shardings, for restore
    loss_chunk: int = 0       # a causal LM's loss this many tokens' logits at a time; 0: all


FROZEN_DTYPES = ("compute", "float32")
METHOD_STATE = "method_state"  # the train state's key for a method's running state, if any


def frozen_dtypes(config, model, frozen_shapes: dict) -> dict:
    """The frozen tree's shapes as the state holds them. With ``train.frozen_dtype='compute'``
    (the default) and a low-precision compute dtype, frozen matrices are held in it: the step
    reads (and FSDP gathers) half the bytes, and never a float32 copy of the base. Vectors
    (norms, biases) stay float32, as their math does."""
    choice = config.train.get("frozen_dtype", "compute")
    if choice not in FROZEN_DTYPES:
        raise ValueError(f"config.train.frozen_dtype={choice!r} is not one of {FROZEN_DTYPES}")
    dtype = model.config.compute_dtype if choice == "compute" else jnp.dtype(jnp.float32)

    def one(shape):
        if len(shape.shape) >= 2 and jnp.issubdtype(shape.dtype, jnp.floating):
            return jax.ShapeDtypeStruct(shape.shape, dtype)
        return shape
    return jax.tree.map(one, frozen_shapes)


def _loss_chunk(config, model) -> int:
    chunk = config.train.get("loss_chunk", 0)
    if not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"config.train.loss_chunk={chunk!r} is not a token count >= 0 "
                         f"(0: the whole batch's logits at once)")
    if chunk and model.task != "causal_lm":
        raise ValueError(f"config.train.loss_chunk={chunk} chunks a causal LM's loss; "
                         f"{config.model.name} is a {model.task} model (set it to 0)")
    return chunk


def _opt_state_shardings(opt_shapes, param_shapes, param_shardings, mesh):
    """Optimizer leaves that mirror a parameter (Adam's mu and nu) live where it lives; the
    rest (counters) are replicated."""
    mirrors = list(zip(tree_lib.flatten(param_shapes).items(),
                       tree_lib.flatten(param_shardings).values()))
    replicated = NamedSharding(mesh, PartitionSpec())
    def one(key_path, leaf):
        path = checkpoint.key_path_name(key_path)
        for (param_path, param), param_sharding in mirrors:
            if path.endswith("/" + param_path) and leaf.shape == param.shape:
                return param_sharding
        return replicated
    return jax.tree_util.tree_map_with_path(one, opt_shapes)


def method_context(config, model) -> methods.Context:
    """What a method's ``prepare`` may read of the run (each part computed only if asked)."""
    def batches():
        return iter(make_loader(config, "train", training=True,
                                batch_size=config.train.batch_size))
    return methods.Context(config, model, functools.partial(model_params, config, model),
                           batches, exported_params)


def make_setup(config, model, total_steps: int, devices=None) -> Setup:
    """Everything static about the run, from shapes alone (``devices`` default: all), after
    the method's host-side ``prepare``."""
    method = methods.build(config.get("method")).prepare(method_context(config, model))
    if model.config.scan_layers and not method.scannable:
        name = config.method.get("name", "full")
        raise ValueError(f"config.model.scan_layers: method {name!r} keys its sites by layer "
                         f"path and cannot run under a scanned stack; set "
                         f"config.model.scan_layers=False")
    model_shapes, model_logical = abstract_params(model)
    stats_shapes = jax.eval_shape(
        functools.partial(method.calibrate, model.module), model_shapes,
        _stack([model.dummy_inputs(1)] * max(method.calibration_batches, 1)))
    shapes = jax.eval_shape(method.init, jax.random.key(0), model_shapes, stats_shapes)
    logical = method.logical_axes(model_logical, shapes)
    rules = tuple(tuple(rule) for rule in config.sharding.rules)
    try:
        mesh = sharding.make_mesh(dict(config.mesh), devices)
    except ValueError as err:
        raise ValueError(f"config.mesh: {err}") from None
    trainable_patterns = config.optim.get("trainable", None)
    trainable = optim.trainable_mask(
        shapes, config.optim.get("frozen", ()),
        method.trainable_for(shapes) if trainable_patterns is None else trainable_patterns)
    train_shapes, frozen_shapes = tree_lib.split(shapes, trainable)
    frozen_shapes = frozen_dtypes(config, model, frozen_shapes)
    tx = optim.make_optimizer(config.optim, train_shapes, total_steps)

    param_shardings = sharding.param_shardings(shapes, logical, mesh, rules)
    train_shardings, frozen_shardings = tree_lib.split(param_shardings, trainable)
    opt_shapes = jax.eval_shape(tx.init, train_shapes)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = {
        "step": replicated, "rng": replicated,
        "trainable": train_shardings, "frozen": frozen_shardings,
        "opt_state": _opt_state_shardings(opt_shapes, train_shapes, train_shardings, mesh),
    }
    state_shapes = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
        "trainable": train_shapes, "frozen": frozen_shapes, "opt_state": opt_shapes,
    }
    # A method's running state (AdaLoRA's importance averages): its leaves that mirror a
    # trainable leaf live where it lives, as the optimizer's do. An empty one adds no key, so
    # every other method's state (and checkpoint) is as it was.
    method_shapes = jax.eval_shape(method.init_state, train_shapes)
    if method_shapes:
        state_shapes[METHOD_STATE] = method_shapes
        state_shardings[METHOD_STATE] = _opt_state_shardings(method_shapes, train_shapes,
                                                              train_shardings, mesh)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        state_shapes, state_shardings)
    return Setup(model, method, mesh, rules, trainable, tx, param_shardings, state_shardings,
                 abstract_state, _loss_chunk(config, model))


def init_params(config, setup: Setup, rng) -> dict:
    """Params created directly on their shardings: random init inside a jit with
    ``out_shardings``, or, with ``config.model.pretrained``, every leaf placed shard by shard
    from the safetensors file (heads the checkpoint lacks are initialised alone, from the same
    key), or, with ``config.model.init_from``, from another run's exported last checkpoint;
    then the method's own leaves, which may depend on the pretrained weights (PiSSA, CorDA...).
    Leaves of that run's export that the model lacks (a trained prompt) start the method's
    leaves of the same path and shape (progressive prompts)."""
    model_rng, method_rng = jax.random.split(rng)
    # From the model's own axes: a method may replace a model leaf (QLoRA's quantised kernels).
    model_shardings = sharding.param_shardings(*abstract_params(setup.model), setup.mesh,
                                               setup.rules)
    pretrained, init_from = config.model.get("pretrained"), config.model.get("init_from")
    carried = {}
    if init_from:
        params, carried = _params_from_run(init_from, setup.model.param_shapes(),
                                           model_shardings)
    elif pretrained:
        _, loaded = hf.load_pretrained(pretrained, model=setup.model, rng=model_rng)
        flat_shardings = tree_lib.flatten(model_shardings)
        params = tree_lib.unflatten({
            path: jax.make_array_from_callback(value.shape, flat_shardings[path],
                                               lambda index, v=np.asarray(value): v[index])
            for path, value in tree_lib.flatten(loaded).items()})
    else:
        params = jax.jit(setup.model.init, out_shardings=model_shardings)(model_rng)
    stats = calibration_stats(config, setup, params)
    params = jax.jit(setup.method.init, out_shardings=setup.param_shardings)(
        method_rng, params, stats)
    if not carried:
        return params
    flat, flat_shardings = dict(tree_lib.flatten(params)), tree_lib.flatten(setup.param_shardings)
    for path, value in carried.items():
        if path in flat and flat[path].shape == value.shape:
            flat[path] = jax.make_array_from_callback(
                value.shape, flat_shardings[path],
                lambda index, v=value.astype(flat[path].dtype, copy=False): v[index])
    return tree_lib.unflatten(flat)


RUN_METHOD = "method.json"  # in a workdir: the run's config.method, to export its checkpoints


def record_method(config, workdir: str) -> None:
    """Write ``config.method`` to ``workdir/method.json`` (atomically, process 0), so later
    readers of the run's checkpoints can export them (:func:`exported_params`)."""
    if jax.process_index() != 0:
        return
    method = config.get("method") or {}
    options = method.to_dict() if hasattr(method, "to_dict") else dict(method)
    path = os.path.join(os.path.abspath(workdir), RUN_METHOD)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as file:
        json.dump(options, file, indent=2, default=list)
    os.replace(path + ".tmp", path)


def exported_params(workdir: str, key: str = "config.model.init_from") -> dict:
    """Another run's last checkpoint as plain params: its method (``workdir/method.json``)
    exports it (LoRA merged, the grafted model; a prompt kept beside). A run without that
    record (written by hand, say) is read as saved. ``key`` names the option in errors."""
    saved = checkpoint.final_params(workdir, key=key)
    record = os.path.join(workdir, RUN_METHOD)
    if not os.path.isfile(record):
        return saved
    with open(record) as file:
        options = json.load(file)
    try:
        method = methods.build(options)
    except ValueError as err:
        raise ValueError(f"{key}={workdir!r}: {record}: {err}") from None
    return jax.device_get(method.export(saved))


def model_params(config, model) -> dict:
    """The run's initial model params without the method (pretrained, fresh or
    ``init_from``), as a run of this config would start; what ``prepare`` reads."""
    variant = copy.deepcopy(config)
    with variant.unlocked():
        variant.method = dict(name="full")
    setup = make_setup(variant, model, int(config.train.steps))
    return init_params(variant, setup, init_key(config))


def _params_from_run(workdir: str, shapes: dict, shardings: dict) -> tuple[dict, dict]:
    """``(model params, carried)`` from another run's exported last checkpoint: the model's
    leaves, each checked against the model's shape and placed on its sharding, and the leaves
    the model lacks (in host memory), which may start the new method's leaves."""
    saved = {path: np.asarray(value)
             for path, value in tree_lib.flatten(exported_params(workdir)).items()}
    flat_shardings = tree_lib.flatten(shardings)
    placed = {}
    for path, shape in tree_lib.flatten(shapes).items():
        if path not in saved:
            raise ValueError(f"config.model.init_from={workdir!r} has no param {path!r}; "
                             f"closest: {tree_lib.closest_paths(path, saved)}")
        value = np.asarray(saved[path])
        if value.shape != shape.shape:
            raise ValueError(f"config.model.init_from={workdir!r}: {path!r} has shape "
                             f"{value.shape}, the model expects {shape.shape}")
        # A run with a bfloat16 frozen base saved it so; this model starts from its dtype.
        value = value.astype(shape.dtype, copy=False)
        placed[path] = jax.make_array_from_callback(value.shape, flat_shardings[path],
                                                    lambda index, v=value: v[index])
    carried = {path: value for path, value in saved.items() if path not in placed}
    return tree_lib.unflatten(placed), carried


def _stack(batches: list[dict]) -> dict:
    return {k: jnp.stack([b[k] for b in batches]) for k in batches[0]}


def calibration_stats(config, setup: Setup, params):
    """What the method's ``calibrate`` makes of its first ``calibration_batches`` training
    batches (model inputs only), or None when it reads none. A loader of its own, so the
    training stream is untouched."""
    count = setup.method.calibration_batches
    if not count:
        return None
    batches = iter(make_loader(config, "train", training=True,
                               batch_size=config.train.batch_size))
    names = setup.model.module.input_names
    inputs = [global_batch(setup, {k: v for k, v in next(batches).items() if k in names})
              for _ in range(count)]
    calibrate = jax.jit(_under_rules(setup, lambda p, b: setup.method.calibrate(
        setup.model.module, p, _stack(b))))
    return calibrate(params, inputs)


def init_key(config) -> jax.Array:
    """The key of the fresh (not pretrained) weights: from ``config.seed``, or from
    ``config.model.init_seed`` when set, so runs can share their starting point yet differ in
    data order and dropout (soup ingredients must start from one point)."""
    init_seed = config.model.get("init_seed")
    return jax.random.fold_in(jax.random.key(config.seed if init_seed is None else init_seed), 0)


def _split_as_state(setup: Setup, params: dict) -> tuple[dict, dict]:
    """``(trainable, frozen)`` of plain params, the frozen part in the state's dtypes."""
    trainable, frozen = tree_lib.split(params, setup.trainable)
    # Elementwise, so each leaf keeps its sharding; a leaf already in its dtype is not copied.
    frozen = jax.tree.map(lambda x, s: x if x.dtype == s.dtype else x.astype(s.dtype), frozen,
                          setup.abstract_state["frozen"])
    return trainable, frozen


def init_state(config, setup: Setup) -> dict:
    rng = jax.random.key(config.seed)
    params = init_params(config, setup, init_key(config))
    trainable, frozen = _split_as_state(setup, params)
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings["opt_state"])(trainable)
    state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(rng),
             "trainable": trainable, "frozen": frozen, "opt_state": opt_state}
    if METHOD_STATE in setup.state_shardings:
        state[METHOD_STATE] = jax.jit(setup.method.init_state,
                                      out_shardings=setup.state_shardings[METHOD_STATE])(trainable)
    # Committed to the step's own shardings, so the first step compiles once, not twice.
    return jax.device_put(state, setup.state_shardings)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def _forward_sums(setup: Setup, trainable, frozen, batch, rng, *, training: bool):
    """Summed task metrics, and the method's loss terms and metrics (training only)."""
    model = setup.model
    inputs, targets = tasks.model_inputs(model, batch, rng, training=training)
    variables = {"params": tree_lib.combine(trainable, frozen)}
    options = dict(deterministic=not training, rngs={"dropout": rng})
    if setup.loss_chunk:  # the model stops at its hidden states; the loss applies the head
        options["method"] = "hidden"
    applied = setup.method.apply(model.module, variables, **inputs, **options)
    outputs = applied.outputs
    if setup.loss_chunk:
        def head(hidden):
            return setup.method.apply(model.module, variables, hidden, method="head").outputs
        return tasks.chunked_loss_sums(head, outputs, targets, setup.loss_chunk), applied
    return tasks.loss_sums(model, outputs, targets), applied


RNG_IMPLS = ("unsafe_rbg", "rbg", "threefry2x32")


def step_key(key, impl: str):
    """The step's random key in PRNG ``impl``. The state keeps a threefry key; the RBG
    generators draw bits with XLA's RngBitGenerator, cheaper than threefry for large draws
    (token masking) at the price of bits that depend on the sharding; 'threefry2x32' keeps them
    sharding-invariant. Dropout draws only two words per call from it
    (``research/models/dropout.py``), so its masks are sharding-invariant either way."""
    if impl not in RNG_IMPLS:
        raise ValueError(f"config.train.rng_impl={impl!r} is not one of {RNG_IMPLS}")
    if impl == "threefry2x32":
        return key
    # Both RBG generators take four 32-bit words of key data.
    return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=impl)


def make_train_step(setup: Setup, grad_accum: int = 1, rng_impl: str = "unsafe_rbg"):
    """One jitted update step with the state donated; after the optimizer's update the
    method's ``after_update`` sees the step's gradients (AdaLoRA reallocates its ranks). With
    ``grad_accum > 1`` the batch is cut into interleaved micro-batches (so each device keeps its
    share of every one) and the gradients are summed in a scan. ``rng_impl``: see
    :func:`step_key`."""

    def loss_fn(trainable, frozen, batch, rng):
        sums, applied = _forward_sums(setup, trainable, frozen, batch, rng, training=True)
        count = jnp.maximum(sums["count"], 1.0)
        # Terms and metrics are batch means; logged as sums like the task loss so ``means``
        # divides once. Only the terms join the optimised loss.
        metrics = jax.lax.stop_gradient(
            {name: jnp.asarray(value, jnp.float32) for name, value in applied.metrics.items()})
        sums = {**sums, **{name: value * count
                           for name, value in {**applied.losses, **metrics}.items()}}
        return sums["loss"] / count + sum(applied.losses.values()), sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        rng = step_key(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]),
                                          state["step"]), rng_impl)
        if grad_accum == 1:
            (_, sums), grads = grad_fn(state["trainable"], state["frozen"], batch, rng)
        else:
            micro = jax.tree.map(
                lambda x: jnp.moveaxis(x.reshape(-1, grad_accum, *x.shape[1:]), 1, 0), batch)
            def body(carry, xs):
                index, micro_batch = xs
                (_, sums), grads = grad_fn(state["trainable"], state["frozen"], micro_batch,
                                           jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (grads, sums)), None
            sums_shape = jax.eval_shape(grad_fn, state["trainable"], state["frozen"],
                                        jax.tree.map(lambda x: x[0], micro), rng)[0][1]
            zeros = jax.tree.map(jnp.zeros_like, state["trainable"]), jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
            (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        grad_norm = optax.tree.norm(grads)
        # A step whose loss or gradients are not finite changes nothing but the step counter
        # (its batch is consumed); the run then stops or counts it (``config.train.nonfinite``).
        # A cond, not a where over the trees: no second copy of params and optimizer state.
        finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)

        def update(trainable, opt_state, method_state):
            updates, opt_state = setup.tx.update(grads, opt_state, trainable)
            trainable, method_state = setup.method.after_update(
                method_state, optax.apply_updates(trainable, updates), grads, state["step"])
            return trainable, opt_state, method_state

        trainable, opt_state, method_state = jax.lax.cond(
            finite, update, lambda *unchanged: unchanged,
            state["trainable"], state["opt_state"], state.get(METHOD_STATE, {}))
        new_state = {**state, "step": state["step"] + 1, "opt_state": opt_state,
                     "trainable": trainable}
        if method_state:
            new_state[METHOD_STATE] = method_state
        metrics = jax.tree.map(lambda x: jnp.where(finite, x, 0.0),
                               {**sums, "grad_norm": grad_norm})
        return new_state, {**metrics, "nonfinite": 1 - finite.astype(jnp.int32)}

    with_rules = _under_rules(setup, step)
    return jax.jit(with_rules, in_shardings=(setup.state_shardings, _batch_sharding(setup)),
                   out_shardings=(setup.state_shardings, None), donate_argnums=0)


def make_eval_step(setup: Setup):
    """Summed metrics of ``{"trainable": ..., "frozen": ...}`` params on a batch (the state's
    other parts are not needed, so plain params evaluate without an optimizer state)."""
    def step(params, batch):
        return _forward_sums(setup, params["trainable"], params["frozen"], batch,
                             jax.random.key(0), training=False)[0]
    shardings = {part: setup.state_shardings[part] for part in ("trainable", "frozen")}
    return jax.jit(_under_rules(setup, step), in_shardings=(shardings, _batch_sharding(setup)))


def _under_rules(setup: Setup, fn):
    """Trace ``fn`` with the mesh and logical rules active, so the model's activation
    constraints resolve to mesh axes."""
    def wrapped(*args):
        with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh), \
                nn.logical_axis_rules(setup.rules):
            return fn(*args)
    return wrapped


def _batch_sharding(setup: Setup) -> NamedSharding:
    return sharding.batch_sharding(setup.mesh, setup.rules)


def global_batch(setup: Setup, local_batch: dict) -> dict:
    """Assemble this process's rows into global arrays split along the batch rule."""
    target = _batch_sharding(setup)
    return {k: jax.make_array_from_process_local_data(target, np.asarray(v))
            for k, v in local_batch.items()}


# ---------------------------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------------------------


def make_loader(config, split: str, *, training: bool, batch_size: int, start_batch: int = 0,
                pad_remainder: bool = False):
    """``config.data.options`` apply to every split; ``config.data.train_options`` (a training
    subset, say) to the training stream only, so evaluation always sees the whole split. An
    evaluation stream's last global batch is short, or padded (see ``Loader.valid``)."""
    options = dict(config.data.get("options", {}))
    if training:
        options.update(config.data.get("train_options") or {})
    if batch_size % jax.process_count():
        raise ValueError(f"batch size {batch_size} (config.train.batch_size or eval_batch_size) "
                         f"does not divide over {jax.process_count()} processes")
    return data_lib.make_loader(
        config.data.name, split, batch_size=batch_size, seed=config.seed, shuffle=training,
        num_epochs=None if training else 1, start_batch=start_batch, drop_remainder=training,
        pad_remainder=pad_remainder, data_dir=config.data.get("data_dir"), **options)


def evaluate(config, setup: Setup, eval_step, state, split: str) -> dict:
    """Mean metrics of the state's params on ``split``."""
    params = {"trainable": state["trainable"], "frozen": state["frozen"]}
    batch_size = config.train.get("eval_batch_size", config.train.batch_size)
    # Padded, so that every process runs the same number of steps.
    loader = make_loader(config, split, training=False, batch_size=batch_size,
                         pad_remainder=True)
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for index, batch in enumerate(loader):
        sums = eval_step(params, global_batch(setup, {**batch, "valid": loader.valid(index)}))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    return {f"{split}/{k}": v for k, v in tasks.means(totals).items()}


def evaluate_params(config, setup: Setup, eval_step, params: dict, split: str) -> dict:
    """:func:`evaluate` for a plain params tree (a merge, a graft, a pruned model), split and
    placed as the run's state would hold it."""
    trainable, frozen = _split_as_state(setup, params)
    placed = jax.device_put({"trainable": trainable, "frozen": frozen},
                            {part: setup.state_shardings[part] for part in ("trainable", "frozen")})
    return evaluate(config, setup, eval_step, placed, split)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


NONFINITE = ("stop", "skip")


class RunStopped(RuntimeError):
    """The run stopped itself (a non-finite loss); the message says where, and the last good
    checkpoint is kept."""


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _nonfinite_stop(config, workdir: str, sampler, batch: int, step: int, manager) -> RunStopped:
    """The error for a non-finite loss at ``step``, after writing the record indices of its
    global batch to the workdir (a run that cannot go on must leave what is needed to debug)."""
    path = os.path.join(os.path.abspath(workdir), f"nonfinite_step_{step}.json")
    if jax.process_index() == 0:
        report = {"step": step, "dataset": config.data.name, "split": "train", "batch": batch,
                  "records": sampler.batch_records(batch)}
        with open(path + ".tmp", "w") as f:
            json.dump(report, f)
        os.replace(path + ".tmp", path)
    manager.wait_until_finished()
    return RunStopped(
        f"non-finite loss or gradients at step {step} (global batch {batch} of the "
        f"{config.data.name!r} training stream; its record indices are in {path}); the last good "
        f"checkpoint is step {manager.latest_step()}; config.train.nonfinite='skip' skips such "
        "steps instead")


def train(config, workdir: str) -> dict:
    """Train ``config`` in ``workdir``, resuming from its newest readable checkpoint; returns
    the final evaluation metrics, or ``{"preempted_at_step": step}`` after a SIGTERM (the state
    of that step is saved; rerunning resumes there)."""
    from tqdm import tqdm

    nonfinite = config.train.get("nonfinite", "stop")
    if nonfinite not in NONFINITE:
        raise ValueError(f"config.train.nonfinite={nonfinite!r} is not one of {NONFINITE}")

    # --- Model, method, optimizer, shardings (shapes only) ---------------------------------
    model = build_model(config)
    total_steps = int(config.train.steps)
    setup = make_setup(config, model, total_steps)
    _log(banner.describe(setup))
    record_method(config, workdir)

    # --- State: restored from the workdir, or created on its devices ------------------------
    manager = checkpoint.make_manager(workdir, keep=config.checkpoint.get("keep", 2),
                                      save_every=config.checkpoint.get("every", 100),
                                      async_save=config.checkpoint.get("async", True))
    restored = checkpoint.restore_latest(manager, setup.abstract_state)
    progress_state = {"batches": 0, "skipped_steps": 0}  # saved beside the state
    if restored is None:
        state = init_state(config, setup)
    else:
        restored_step, state, saved = restored
        progress_state.update({"batches": restored_step, **(saved or {})})
        _log(f"resumed from {workdir} at step {restored_step}")

    # --- Data: the training stream from the first batch the state has not seen --------------
    first_batch = int(progress_state["batches"])
    train_loader = make_loader(config, "train", training=True, batch_size=config.train.batch_size,
                               start_batch=first_batch)
    train_iter = iter(train_loader)

    # --- Steps ------------------------------------------------------------------------------
    train_step = make_train_step(setup, int(config.train.get("grad_accum", 1)),
                                 config.train.get("rng_impl", "unsafe_rbg"))
    eval_step = make_eval_step(setup)
    writer = MetricWriter(workdir, tensorboard=config.train.get("tensorboard", True))
    log_every = int(config.train.get("log_every", 10))
    eval_every = int(config.train.get("eval_every", 0))
    start = int(state["step"])
    skipped = int(progress_state["skipped_steps"])

    def batches_after(done: int) -> int:
        """Global batches the stream has given once step ``done`` is over."""
        return first_batch + done - start
    window, window_steps, window_start = None, 0, time.perf_counter()
    unchecked = []  # (step, its non-finite flag on the device) not read yet

    def check():
        """Read the steps' non-finite flags, only where the host waits for the device anyway
        (logging, saving, the end): no round trip per step. A bad step changed nothing, and no
        checkpoint is written before its flag is read, so stopping a few steps late is safe."""
        nonlocal skipped
        flags = jax.device_get([flag for _, flag in unchecked])
        bad = [done for (done, _), flag in zip(unchecked, flags) if flag]
        unchecked.clear()
        if bad and nonfinite == "stop":
            raise _nonfinite_stop(config, workdir, train_loader.sampler,
                                  batches_after(bad[0]) - 1, bad[0], manager)
        skipped += len(bad)

    progress = tqdm(range(start, total_steps), initial=start, total=total_steps,
                    disable=jax.process_index() != 0, desc="train", dynamic_ncols=True)
    with preemption.Preemption() as preempt:
        for step in progress:
            state, sums = train_step(state, global_batch(setup, next(train_iter)))
            done = step + 1
            unchecked.append((done, sums["nonfinite"]))
            window = sums if window is None else jax.tree.map(jnp.add, window, sums)
            window_steps += 1
            if done % log_every == 0 or done == total_steps:
                metrics = {f"train/{k}": v for k, v in tasks.means(window).items()
                           if k != "nonfinite"}  # waits for the step
                seconds = time.perf_counter() - window_start
                finite_steps = max(window_steps - int(window["nonfinite"]), 1)
                metrics["train/grad_norm"] = float(window["grad_norm"]) / finite_steps
                metrics["train/steps_per_s"] = window_steps / max(seconds, 1e-9)
                check()
                if nonfinite == "skip":
                    metrics["train/skipped_steps"] = skipped
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                writer.write(done, metrics)
                window, window_steps, window_start = None, 0, time.perf_counter()
            if eval_every and done % eval_every == 0 and done != total_steps:
                eval_start = time.perf_counter()
                writer.write(done, evaluate(config, setup, eval_step, state, "validation"))
                window_start += time.perf_counter() - eval_start  # steps/s counts training only
            preempted = preempt.reached(done)
            if done == total_steps or preempted or manager.should_save(done):
                check()
                checkpoint.save(manager, done, state,
                                {"batches": batches_after(done), "skipped_steps": skipped},
                                force=done == total_steps or preempted)
            if preempted and done != total_steps:
                manager.wait_until_finished()
                manager.close()
                writer.close()
                _log(f"preempted: saved step {done} in {workdir}; rerun to resume")
                return {"preempted_at_step": done}

    # --- Final evaluation -------------------------------------------------------------------
    manager.wait_until_finished()
    results = {}
    for split in config.train.get("final_eval_splits", ("validation", "test")):
        results.update(evaluate(config, setup, eval_step, state, split))
    if nonfinite == "skip":
        results["train/skipped_steps"] = skipped
    writer.write(int(state["step"]), results)
    writer.close()
    manager.close()
    return results
