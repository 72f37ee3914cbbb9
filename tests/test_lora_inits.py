"""LoRA initialised from the pretrained weight (PiSSA, OLoRA, CorDA): the adapted model equals
the original at step 0 on Dense, multi-axis (query) and two-input-axis (attention out) kernels;
PiSSA's adapter is the best rank-r approximation; CorDA's covariances count real tokens only,
run through the training loop's calibrate-then-init path, and IPM / KPM keep the largest /
smallest context-oriented components; bad options are one-line errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import tree
from research.lowrank import init as init_lib
from research.lowrank.lora import LoRA
from research.models import hf
from research.train import loop
from tests.tiny_bert import random_params, tiny_model, token_batch
from test_train import random_batch, tiny_config

TARGETS = ((r"encoder/layer_0/attn/(query|out)/kernel", 4),  # [32, 4, 8] and [4, 8, 32]
           (r"encoder/layer_0/mlp/wi/kernel", 3))              # Dense [32, 64]
KERNELS = ("encoder/layer_0/attn/query/kernel", "encoder/layer_0/attn/out/kernel",
           "encoder/layer_0/mlp/wi/kernel")
WEIGHT_INITS = ("pissa", "olora", "corda_ipm", "corda_kpm")


def stacked_batches(count=2, rows=3, length=12, pad=0):
    """Model inputs for ``calibrate``: ``count`` batches on a leading axis; ``pad`` extra
    padded positions (random ids, mask 0) at the end of every row."""
    parts = [token_batch(rows, length, seed=index) for index in range(count)]
    rng = np.random.default_rng(7)
    ids = [np.concatenate([i, rng.integers(1, 100, (rows, pad))], 1) for i, _, _ in parts]
    masks = [np.concatenate([m, np.zeros((rows, pad), np.int32)], 1) for _, m, _ in parts]
    return {"input_ids": jnp.asarray(np.stack(ids), jnp.int32),
            "attention_mask": jnp.asarray(np.stack(masks), jnp.int32),
            "token_type_ids": jnp.zeros((count, rows, length + pad), jnp.int32)}


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, random_params(model)


@pytest.fixture(scope="module")
def covariances(tiny):
    model, params = tiny
    method = LoRA(targets=TARGETS, init_weights="corda_ipm")
    return jax.jit(lambda p, b: method.calibrate(model.module, p, b))(params, stacked_batches())


@pytest.fixture(scope="module")
def adapt(tiny, covariances):
    """``init -> (method, adapted params)``, each made once (eagerly: the per-matrix inits are
    compiled per kernel shape and shared, cheaper than compiling one graph per init)."""
    @functools.cache
    def make(init):
        method = LoRA(targets=TARGETS, alpha=16.0, init_weights=init)
        stats = covariances if method.corda else None
        return method, method.init(jax.random.key(0), tiny[1], stats)
    return make


@pytest.mark.parametrize("init", WEIGHT_INITS)
def test_init_from_the_weight_leaves_outputs_unchanged(tiny, adapt, init):
    model, params = tiny
    method, adapted = adapt(init)
    flat, before = tree.flatten(adapted), tree.flatten(params)
    for path in KERNELS:
        module = path.rpartition("/")[0]
        update = tree.flatten(method.scales(adapted))[path] * np.tensordot(
            flat[f"{module}/lora_a"], flat[f"{module}/lora_b"], 1)
        assert np.abs(update).max() > 1e-4, path  # not LoRA's B = 0: a part of W moved
        np.testing.assert_allclose(flat[path] + update, before[path], atol=1e-5, err_msg=path)
    ids, mask, types = token_batch(seed=3)
    base = model.module.apply({"params": params}, ids, mask, types)
    ours = method.apply(model.module, {"params": adapted}, ids, mask, types).outputs
    for x, y in zip(base, ours):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-4)


def test_pissa_adapter_is_the_best_rank_r_approximation(tiny, adapt):
    _, params = tiny
    method, adapted = adapt("pissa")
    flat, scales = tree.flatten(adapted), tree.flatten(method.scales(adapted))
    for path, n_in in zip(KERNELS, (1, 2, 1)):
        w = np.asarray(tree.flatten(params)[path], np.float64)
        w = w.reshape(int(np.prod(w.shape[:n_in])), -1)
        a, b = (np.asarray(flat[f"{path.rpartition('/')[0]}/{name}"], np.float64)
                for name in ("lora_a", "lora_b"))
        r = a.shape[-1]
        update = scales[path] * a.reshape(-1, r) @ b.reshape(r, -1)
        residual = np.asarray(flat[path], np.float64).reshape(w.shape)
        sigma = np.linalg.svd(w, compute_uv=False)
        np.testing.assert_allclose(np.linalg.svd(update, compute_uv=False)[:r], sigma[:r],
                                   rtol=1e-4, err_msg=path)
        np.testing.assert_allclose(np.linalg.svd(residual, compute_uv=False)[:len(sigma) - r],
                                   sigma[r:], rtol=1e-4, atol=1e-5, err_msg=path)


def test_calibration_counts_real_tokens_only(tiny, covariances):
    model, params = tiny
    method = LoRA(targets=TARGETS, init_weights="corda_kpm", calibration_batches=2)
    padded = method.calibrate(model.module, params, stacked_batches(pad=5))
    assert set(covariances) == set(KERNELS)
    assert covariances["encoder/layer_0/attn/out/kernel"].shape == (32, 32)  # heads x head_dim
    # Extra padding (random ids) changes neither sum xᵀx nor the count.
    for path in KERNELS:
        np.testing.assert_allclose(padded[path], covariances[path], rtol=1e-5, atol=1e-6,
                                   err_msg=path)
    # The query's input is the embedding output: its second moment over real tokens.
    batches = stacked_batches()
    rows = []
    for ids, mask, types in zip(*(batches[k] for k in ("input_ids", "attention_mask",
                                                       "token_type_ids"))):
        x = model.module.apply({"params": params}, ids, types, True,
                               method=lambda m, i, t, d: m.embeddings(i, t, d))
        rows.append(np.asarray(x)[np.asarray(mask, bool)])
    x = np.concatenate(rows).astype(np.float64)
    np.testing.assert_allclose(covariances["encoder/layer_0/attn/query/kernel"],
                               x.T @ x / len(x), rtol=1e-4, atol=1e-6)


def test_ipm_and_kpm_keep_the_largest_and_smallest_components(tiny, covariances, adapt):
    _, params = tiny
    path = "encoder/layer_0/mlp/wi/kernel"
    w = np.asarray(tree.flatten(params)[path], np.float64)
    damped, _ = init_lib.damped_inverse(covariances[path])
    sigma = np.linalg.svd(np.asarray(damped, np.float64) @ w, compute_uv=False)
    updates = {}
    for init in ("corda_ipm", "corda_kpm"):
        method, adapted = adapt(init)
        flat = tree.flatten(adapted)
        a, b = (np.asarray(flat[f"encoder/layer_0/mlp/wi/{n}"], np.float64)
                for n in ("lora_a", "lora_b"))
        updates[init] = tree.flatten(method.scales(adapted))[path] * a @ b
        # The adapter holds 3 of the components of C·W: the largest (IPM) or smallest (KPM).
        got = np.linalg.svd(np.asarray(damped, np.float64) @ updates[init], compute_uv=False)
        want = sigma[:3] if init == "corda_ipm" else sigma[-3:]
        np.testing.assert_allclose(got[:3], want, rtol=1e-3, err_msg=init)
    assert sigma[2] > 2 * sigma[-3]
    # Different components: the two updates' output spaces are nearly orthogonal.
    q_ipm = np.linalg.qr(updates["corda_ipm"].T)[0][:, :3]
    q_kpm = np.linalg.qr(updates["corda_kpm"].T)[0][:, :3]
    assert np.linalg.norm(q_ipm.T @ q_kpm) < 0.5


def test_corda_through_the_training_loop_leaves_outputs_unchanged(tmp_path):
    """calibrate on real rotten_tomatoes batches, then init, as a run does, from a
    "pretrained" checkpoint (so the base weights are known without a second init)."""
    config = tiny_config()
    config.data.data_dir = str(tmp_path / "data")
    config.mesh = dict(data=1)
    config.method = dict(name="lora", targets=((r"encoder/.*/(query|out)/kernel", 4),),
                         alpha=8.0, init_weights="corda_ipm", calibration_batches=2,
                         also_train=(r"classifier/.*",))
    model = loop.build_model(config)
    base = random_params(model, scale=0.05)
    hf.save_pretrained(model, base, str(tmp_path / "base"))
    config.model.pretrained = str(tmp_path / "base")
    setup = loop.make_setup(config, model, 10, devices=jax.devices()[:1])
    assert setup.method.calibration_batches == 2
    state = loop.init_state(config, setup)
    adapted = tree.combine(state["trainable"], state["frozen"])
    kernel = "encoder/layer_1/attn/out/kernel"
    assert np.abs(tree.flatten(adapted)[kernel] - tree.flatten(base)[kernel]).max() > 1e-4

    batch = random_batch(setup)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], True)
    ours = setup.method.apply(model.module, {"params": adapted}, *inputs,
                              method="encode").outputs
    theirs = model.module.apply({"params": base}, *inputs, method="encode")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)  # the encoder's output


def test_bad_init_options_are_one_line_errors(tiny):
    _, params = tiny
    with pytest.raises(ValueError, match=r"init_weights='svd' is not one of \('kaiming_uniform', "
                                         r"'gaussian', 'pissa', 'olora', 'corda_ipm', "
                                         r"'corda_kpm'\)") as info:
        LoRA(targets=TARGETS, init_weights="svd")
    assert "\n" not in str(info.value)
    assert LoRA(targets=TARGETS, init_weights="corda_kpm").calibration_batches == 8
    assert LoRA(targets=TARGETS, init_weights="pissa").calibration_batches == 0
    with pytest.raises(ValueError, match="calibration_batches=4 is only read by init_weights"):
        LoRA(targets=TARGETS, init_weights="pissa", calibration_batches=4)
    with pytest.raises(ValueError, match="'corda_ipm' needs calibration_batches >= 1"):
        LoRA(targets=TARGETS, init_weights="corda_ipm", calibration_batches=0)
    with pytest.raises(ValueError, match=r"init_weights='olora' adapts kernels; "
                                         r"embeddings/word/embedding is an embedding table"):
        LoRA(targets=((r"embeddings/word/embedding", 2),), init_weights="olora").plan(params)
    with pytest.raises(ValueError, match=r"'corda_ipm' needs the input covariance of "
                                         r"encoder/layer_0/attn/\w+/kernel .*; got none"):
        LoRA(targets=TARGETS, init_weights="corda_ipm").init(jax.random.key(0), params)


def test_a_trained_pissa_adapter_converts_to_plain_lora_over_the_original_base(tiny, adapt):
    """PEFT's conversion: the rank-2r adapter on the original kernels computes what the trained
    adapter computes on the residual ones; exporting the unconverted adapter is refused."""
    from research.lowrank import lora as lora_lib
    from research.lowrank import peft as peft_lib
    from test_lora import randomize_factors

    model, params = tiny
    method, adapted = adapt("pissa")
    initial, _ = lora_lib.lora_factors(adapted, method)
    trained = randomize_factors(adapted, scale=0.1)
    plain, converted = lora_lib.to_plain_lora(method, trained, initial)
    assert plain.init_weights == "kaiming_uniform"
    flat = tree.flatten(converted)
    for path in KERNELS:
        np.testing.assert_allclose(flat[path], tree.flatten(params)[path], atol=1e-5)
        assert flat[path.replace("kernel", "lora_a")].shape[-1] == 2 * (3 if "wi" in path else 4)
    ids, mask, types = token_batch(seed=4)
    expected = method.apply(model.module, {"params": trained}, ids, mask, types).outputs
    got = plain.apply(model.module, {"params": converted}, ids, mask, types).outputs
    for x, y in zip(expected, got):
        np.testing.assert_allclose(x, y, atol=1e-4)
    with pytest.raises(ValueError, match=r"init_weights='pissa' lives on residual base "
                                         r"kernels; convert it first with lora.to_plain_lora"):
        peft_lib.export_peft(method, trained, model, "/nonexistent")
