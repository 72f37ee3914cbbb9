"""The accelerator-grade engine: scanned layers with remat, a bfloat16 frozen base, the chunked
loss. Each is an execution choice, so each must give the unscanned, float32, whole-logits
result (to float tolerance) and save what it promises in XLA's deterministic analyses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from research import models, tree
from research.models.dropout import Dropout
from research.train import checkpoint, loop

NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)
LORA = dict(name="lora", targets=((r".*/(query|value|gate|up|wi)/kernel", 4),), alpha=8)


def _inputs(model, batch=2, length=16):
    rng = np.random.default_rng(0)
    if "image" in model.module.input_names:
        return {"image": rng.normal(size=(batch, *model.dummy_inputs(1)["image"].shape[1:]))
                .astype(np.float32)}
    inputs = model.dummy_inputs(batch, length)
    inputs["input_ids"] = rng.integers(0, 200, (batch, length)).astype(np.int32)
    inputs["attention_mask"][1, length // 2:] = 0
    return inputs


@pytest.mark.parametrize("name", ["llama_tiny_lm", "bert_tiny_classifier", "vit_tiny_classifier"])
def test_scanned_stack_equals_the_unrolled_one_for_every_remat_policy(name):
    """Same params (the public tree keeps ``layer_{i}``), same logits and gradients; BERT's
    classifier also runs its [CLS]-only last block outside the scan."""
    reference = models.build(name, **NO_DROPOUT)
    params = reference.init(jax.random.key(0))
    inputs = _inputs(reference)

    def loss_and_grads(model):
        def loss(p):
            out = model.module.apply({"params": p}, **inputs)
            out = out[0] if isinstance(out, tuple) else out
            return jnp.sum(jnp.sin(out)), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return out, grads

    want_out, want_grads = loss_and_grads(reference)
    for remat in ("none", "full", "dots", "dots_no_batch"):
        model = models.build(name, scan_layers=True, remat=remat, **NO_DROPOUT)
        assert not any(tree.structural_diff(model.param_shapes(), params).values())
        out, grads = loss_and_grads(model)
        np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
        for path, grad in tree.flatten(grads).items():
            want = tree.flatten(want_grads)[path]
            # Float32 summation order differs between the two programs; a leaf summing many
            # terms (the embedding's gradient) then differs by a few ulps of its largest entry.
            atol = max(1e-5, 1e-6 * float(np.abs(want).max()))
            np.testing.assert_allclose(grad, want, atol=atol, rtol=1e-4,
                                       err_msg=f"{name} remat={remat} {path}")


def _dot_count(model, inputs):
    params = model.param_shapes()
    jaxpr = jax.make_jaxpr(lambda p: model.module.apply({"params": p}, **inputs))(params)
    return str(jaxpr).count("dot_general")


def test_a_scanned_stack_traces_one_block_whatever_the_depth():
    """What keeps compilation flat in depth: the program holds one block's matmuls at 2 or 8
    layers (unrolled, it holds every layer's)."""
    def count(layers, scan):
        model = models.build("llama_tiny_lm", num_layers=layers, scan_layers=scan)
        return _dot_count(model, _inputs(model))
    assert count(8, scan=True) == count(2, scan=True)
    assert count(8, scan=False) > 3 * count(2, scan=False) / 1.5


def test_dropout_under_a_scan_draws_a_mask_per_layer():
    """Dropout stays on under the scan, and each layer draws its own masks: the masks that
    layer 0 and layer 1 drop (read back from inside the scan) differ, as they would not if
    every layer got the same key."""
    model = models.build("bert_tiny_encoder", num_layers=3, scan_layers=True)
    params = model.init(jax.random.key(0))
    inputs = _inputs(model)
    dropped = []

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if isinstance(context.module, Dropout) and not kwargs.get("deterministic", True):
            jax.debug.callback(lambda zeros: dropped.append(np.asarray(zeros)), y == 0)
        return y

    def run(key):
        with nn.intercept_methods(record):
            out = model.module.apply({"params": params}, **inputs, deterministic=False,
                                     rngs={"dropout": key})[0]
        return jax.block_until_ready(out)

    one, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(one, again)
    assert float(jnp.max(jnp.abs(one - other))) > 1e-3
    # Per run: the embeddings' dropout, then per layer the attention output's and the MLP's.
    assert len(dropped) == 3 * (1 + 3 * 2)
    per_layer = dropped[1:7]
    assert per_layer[0].shape == per_layer[2].shape
    assert per_layer[0].any() and (per_layer[0] != per_layer[2]).any()


def _run(model_name, method=None, steps=2, batch=4, devices=1, mesh=None, engine=(), train=(),
         overrides=NO_DROPOUT):
    config = common.base_config()
    config.model.name = model_name
    config.model.overrides = dict(overrides)
    config.train.batch_size = batch
    config.mesh = mesh or {"data": devices}
    for key, value in dict(engine).items():
        config.model[key] = value
    for key, value in dict(train).items():
        config.train[key] = value
    if method:
        config.method = method
    model = loop.build_model(config)
    setup = loop.make_setup(config, model, steps, devices=jax.devices()[:devices])
    return config, setup


def _batch(setup, batch=4, length=32):
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(5, 250, (batch, length)).astype(np.int32),
            "attention_mask": np.ones((batch, length), np.int32)}
    data["attention_mask"][1, length - 7:] = 0
    if setup.model.task == "classification":
        data["token_type_ids"] = np.zeros((batch, length), np.int32)
        data["label"] = (np.arange(batch) % 2).astype(np.int32)
    return loop.global_batch(setup, data)


def _losses(config, setup, steps=2, state=None):
    state = loop.init_state(config, setup) if state is None else state
    step = loop.make_train_step(setup)
    losses = []
    for _ in range(steps):
        state, sums = step(state, _batch(setup))
        losses.append(float(sums["loss"] / sums["count"]))
    return losses, state


METHODS = {"full": None, "lora": LORA, "dora": dict(LORA, name="dora"),
           "ln_tuning": dict(name="ln_tuning"),
           "dept": dict(name="dept", prompt_length=4, rank=2)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_scannable_methods_train_the_same_under_a_scan(method):
    """LoRA and DoRA find their per-layer scale through the layer view; methods that only
    choose leaves or act outside the stack (DePT's prompt) need nothing."""
    model = "bert_tiny_classifier" if method == "dept" else "llama_tiny_lm"
    want, _ = _losses(*_run(model, METHODS[method]))
    got, _ = _losses(*_run(model, METHODS[method], engine=dict(scan_layers=True, remat="full")))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert want[1] != want[0]  # it trained


def test_methods_keyed_by_layer_path_refuse_a_scan():
    with pytest.raises(ValueError, match=r"config.model.scan_layers: method 'pela' keys its "
                                         r"sites by layer path"):
        _run("llama_tiny_lm", dict(name="pela", targets=((".*/up/kernel", 0.5),)),
             engine=dict(scan_layers=True))


def test_a_scan_over_layers_that_differ_is_a_one_line_error():
    lora_on_one_layer = dict(name="lora", targets=((r".*/layer_1/attn/query/kernel", 4),))
    config, setup = _run("llama_tiny_lm", lora_on_one_layer, engine=dict(scan_layers=True))
    with pytest.raises(ValueError, match=r"model.scan_layers: layer_1 differs from layer_0 "
                                         r"\(added: attn/query/lora_a\)"):
        _losses(config, setup, steps=1)
    with pytest.raises(ValueError, match="scan_layers=True needs every layer alike; "
                                         "removed_sublayers"):
        models.build("llama_tiny_lm", scan_layers=True, removed_sublayers=("layer_1/mlp",))


def test_lora_scales_that_differ_by_layer_refuse_a_scan():
    per_layer_alpha = dict(LORA, alpha_rules=((r".*/layer_0/.*", 2.0),))
    config, setup = _run("llama_tiny_lm", per_layer_alpha, engine=dict(scan_layers=True))
    with pytest.raises(ValueError, match="the LoRA scale differs between layers"):
        _losses(config, setup, steps=1)


def test_engine_keys_are_checked_with_the_key_named():
    with pytest.raises(ValueError, match=r"config.model \(llama_tiny_lm\): remat='some' is not "
                                         r"one of \('none', 'full', 'dots', 'dots_no_batch'\)"):
        _run("llama_tiny_lm", engine=dict(remat="some"))
    with pytest.raises(ValueError, match=r"attention_impl='flash' is not one of "
                                         r"\('einsum', 'fused'\)"):
        _run("llama_tiny_lm", engine=dict(attention_impl="flash"))
    with pytest.raises(ValueError, match=r"config.model.overrides.scan_layers: set "
                                         r"config.model.scan_layers instead"):
        _run("llama_tiny_lm", overrides=dict(scan_layers=True))
    with pytest.raises(ValueError, match=r"config.train.loss_chunk=64 chunks a causal LM's "
                                         r"loss; bert_tiny_classifier is a classification"):
        _run("bert_tiny_classifier", train=dict(loss_chunk=64))
    with pytest.raises(ValueError, match=r"config.train.frozen_dtype='half' is not one of"):
        _run("llama_tiny_lm", LORA, train=dict(frozen_dtype="half"))


def test_a_sequence_longer_than_max_length_is_an_error_naming_the_key():
    model = models.build("bert_tiny_classifier", max_length=16)
    with pytest.raises(ValueError, match=r"sequence length 32 exceeds the model's "
                                         r"max_length=16 \(model.overrides.max_length\)"):
        model.module.init(jax.random.key(0), **model.dummy_inputs(1, 32))


def test_checkpoints_move_between_scanned_and_unrolled_runs(tmp_path):
    """The state's tree is the same either way, so a real orbax checkpoint written unrolled
    resumes scanned (and the reverse) and continues exactly as an unrolled run would."""
    config, unrolled = _run("llama_tiny_lm", LORA, steps=4)
    _, first = _losses(config, unrolled, steps=2)
    manager = checkpoint.make_manager(str(tmp_path / "run"), keep=1, save_every=1,
                                      async_save=False)
    checkpoint.save(manager, 2, first, {"batches": 2}, force=True)
    manager.wait_until_finished()
    want, _ = _losses(config, unrolled, steps=2, state=first)
    for engine in (dict(scan_layers=True), dict()):
        scan_config, setup = _run("llama_tiny_lm", LORA, steps=4, engine=engine)
        step, state, _ = checkpoint.restore_latest(manager, setup.abstract_state)
        assert step == 2
        got, _ = _losses(scan_config, setup, steps=2, state=state)
        np.testing.assert_allclose(got, want, rtol=2e-6)
    manager.close()


def _compiled_memory(setup, batch=4, length=32):
    state, inputs = setup.abstract_state, _batch(setup, batch, length)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            inputs)
    return loop.make_train_step(setup).lower(state, abstract).compile().memory_analysis()


def test_a_bfloat16_run_holds_its_frozen_base_in_bfloat16():
    """With bf16 compute, frozen matrices are bf16 in the state, the step's arguments shrink by
    half their float32 bytes, and vectors (norm scales) stay float32. The first steps' losses
    agree with a float32 frozen base to bf16 precision."""
    bf16 = dict(NO_DROPOUT, dtype="bfloat16")
    half_config, half = _run("llama_tiny_lm", LORA, overrides=bf16)
    full_config, full = _run("llama_tiny_lm", LORA, overrides=bf16,
                             train=dict(frozen_dtype="float32"))
    frozen = tree.flatten(half.abstract_state["frozen"])
    matrices = {p: s for p, s in frozen.items() if len(s.shape) >= 2}
    assert matrices and all(s.dtype == jnp.bfloat16 for s in matrices.values())
    assert all(s.dtype == jnp.float32 for p, s in frozen.items() if p not in matrices)
    saved = sum(int(np.prod(s.shape)) * 2 for s in matrices.values())
    assert (_compiled_memory(full).argument_size_in_bytes
            - _compiled_memory(half).argument_size_in_bytes) == saved
    got, state = _losses(half_config, half)
    want, _ = _losses(full_config, full)
    np.testing.assert_allclose(got, want, rtol=2e-2)
    assert all(x.dtype == jnp.bfloat16 for p, x in tree.flatten(state["frozen"]).items()
               if p in matrices)


def test_the_chunked_loss_equals_the_whole_one_and_never_holds_all_logits():
    """Same losses over two updates (so the same gradients) with the loss taken 72 tokens'
    logits at a time (positions need not divide the length), and the compiled step's
    temporaries shrink by most of one float32 copy of the whole batch's logits."""
    vocab = dict(NO_DROPOUT, vocab_size=32768)
    whole_config, whole = _run("llama_tiny_lm", overrides=vocab)
    chunk_config, chunked = _run("llama_tiny_lm", overrides=vocab, train=dict(loss_chunk=72))
    np.testing.assert_allclose(_losses(chunk_config, chunked)[0],
                               _losses(whole_config, whole)[0], rtol=2e-6)
    logits_bytes = 4 * 32 * 32768 * 4
    saved = (_compiled_memory(whole).temp_size_in_bytes
             - _compiled_memory(chunked).temp_size_in_bytes)
    assert saved > 0.75 * logits_bytes


def test_a_scanned_step_shards_like_an_unrolled_one():
    """FSDP over 4 devices: the scanned step reaches the single-device losses (the stacked
    layer axis is never sharded, so each device stacks its own shards)."""
    want, _ = _losses(*_run("llama_tiny_lm", engine=dict(scan_layers=True, remat="full")))
    got, _ = _losses(*_run("llama_tiny_lm", devices=4, mesh={"fsdp": 4},
                           engine=dict(scan_layers=True, remat="full")))
    np.testing.assert_allclose(got, want, rtol=1e-5)

