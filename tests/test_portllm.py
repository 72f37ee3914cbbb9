"""PortLLM: a patch taken on the old base and ported back onto it gives the fine-tuned model
(dense and LoRA); a LoRA patch is the merged adapter minus the base; on digits, a patch learned
on an old base lifts a further-trained base on the fine-tuning task (catalog row 4); per-path
scale rules; bad input is a one-line error."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from research import tree
from research.lowrank import lora as lora_lib
from research.lowrank.lora import LoRA
from research.merge import portllm
from test_lora import TARGETS, randomize_factors
from tests.tiny_bert import random_params, tiny_model


def random_tree(seed, shapes):
    rng = np.random.default_rng(seed)
    return tree.unflatten({p: jnp.asarray(rng.normal(size=s), jnp.float32)
                           for p, s in shapes.items()})


SHAPES = {"body/dense/kernel": (6, 5), "body/dense/bias": (5,), "out/kernel": (5, 3)}


def test_dense_patch_ported_onto_the_old_base_gives_back_the_finetune():
    old = random_tree(0, SHAPES)
    finetuned = random_tree(1, {**SHAPES, "head/kernel": (3, 2)})  # a head the base lacks
    patch = portllm.patch_from_finetune(finetuned, old)
    flat_patch = tree.flatten(patch)
    np.testing.assert_array_equal(flat_patch["head/kernel"],
                                  tree.flatten(finetuned)["head/kernel"])
    np.testing.assert_allclose(flat_patch["out/kernel"], tree.flatten(finetuned)["out/kernel"]
                               - tree.flatten(old)["out/kernel"], rtol=0, atol=0)

    ported = portllm.port(old, patch)
    tree.check_same_structure(ported, finetuned)
    for path, value in tree.flatten(finetuned).items():
        # old + (finetuned - old): equal up to the one rounding of the subtraction.
        np.testing.assert_allclose(tree.flatten(ported)[path], value, rtol=1e-6, atol=1e-7,
                                   err_msg=path)

    # Per-path scales: first match wins; 0 keeps the new base's leaf and leaves out a new one.
    rules = [(r"body/.*/bias", 0.0), (r"body/.*", 0.5), (r"head/.*", 0.0)]
    scaled = tree.flatten(portllm.port(old, patch, scale=2.0, rules=rules))
    flat_old = tree.flatten(old)
    np.testing.assert_array_equal(scaled["body/dense/bias"], flat_old["body/dense/bias"])
    np.testing.assert_allclose(scaled["body/dense/kernel"], flat_old["body/dense/kernel"]
                               + 0.5 * flat_patch["body/dense/kernel"], rtol=1e-6)
    np.testing.assert_allclose(scaled["out/kernel"], flat_old["out/kernel"]
                               + 2.0 * flat_patch["out/kernel"], rtol=1e-6)
    assert "head/kernel" not in scaled

    # The new base's dtype is kept.
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), old)
    assert tree.flatten(portllm.port(half, patch))["out/kernel"].dtype == jnp.bfloat16


def test_lora_patch_is_merged_minus_base_and_ports_back_to_the_merged_model():
    model = tiny_model("classifier")
    old = random_params(model)
    method = LoRA(targets=TARGETS, alpha=16.0, alpha_rules=((r".*/wi/kernel", 4.0),),
                  also_train=(r"classifier/.*",))
    # Factor shapes by tracing init (no compile), then random factors, as if trained.
    shapes = jax.eval_shape(method.init, jax.random.key(1), old)
    trained = randomize_factors(tree.unflatten({**tree.flatten(shapes), **tree.flatten(old)}))
    trained = tree.map_with_path(lambda p, x: x + 0.1 if p.startswith("classifier/") else x,
                                 trained)
    merged = tree.flatten(lora_lib.merge(trained, method))
    flat_old = tree.flatten(old)
    adapted = lora_lib.factor_pairs(tree.flatten(trained))

    patch = tree.flatten(portllm.patch_from_lora(trained, method, old_base=old))
    # Only the adapted kernels and the trained head: no factors, no frozen leaves.
    assert set(patch) == set(adapted) | {"classifier/kernel", "classifier/bias"}
    for path in adapted:
        np.testing.assert_allclose(patch[path], merged[path] - flat_old[path], rtol=0,
                                   atol=1e-5, err_msg=path)
    np.testing.assert_allclose(patch["classifier/bias"], 0.1, rtol=1e-5)

    def assert_is_merged(ported):
        assert tree.structural_diff(ported, merged) == tree.structural_diff(merged, merged)
        for path, value in merged.items():
            np.testing.assert_allclose(ported[path], value, rtol=0, atol=1e-6, err_msg=path)

    assert_is_merged(tree.flatten(portllm.port(old, patch)))

    # Without old_base the trained head travels as its value, for a base that has no head.
    headless = {p: x for p, x in flat_old.items() if not p.startswith("classifier/")}
    as_values = tree.flatten(portllm.patch_from_lora(trained, method))
    np.testing.assert_array_equal(as_values["classifier/kernel"],
                                  tree.flatten(trained)["classifier/kernel"])
    assert_is_merged(tree.flatten(portllm.port(tree.unflatten(headless), as_values)))

    with pytest.raises(ValueError, match="plain LoRA adapter.*to_plain_lora"):
        portllm.patch_from_lora(trained, LoRA(targets=TARGETS, init_weights="pissa"))
    with pytest.raises(ValueError, match="no LoRA factors"):
        portllm.patch_from_lora(old, method)
    with pytest.raises(ValueError, match="LoRA factors at .*take its patch with patch_from_lora"):
        portllm.patch_from_finetune(trained, old)


# ---------------------------------------------------------------------------------------------
# A real patch: digits, fine-tuned on mirrored images, ported to a further-trained base
# ---------------------------------------------------------------------------------------------


def log_probs(params, x):
    hidden = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return jax.nn.log_softmax(hidden @ params["out"]["kernel"] + params["out"]["bias"])


TX = optax.adam(1e-2)


@jax.jit
def fit(params, x, y, steps):
    """Full-batch Adam, ``len(steps)`` steps (one compile for every run of the same sizes)."""
    def loss(p):
        return -jnp.mean(jnp.take_along_axis(log_probs(p, x), y[:, None], 1))

    def step(carry, _):
        p, state = carry
        updates, state = TX.update(jax.grad(loss)(p), state, p)
        return (optax.apply_updates(p, updates), state), None

    return jax.lax.scan(step, (params, TX.init(params)), steps)[0][0]


def accuracy(params, x, y):
    return float(np.mean(np.argmax(log_probs(params, x), -1) == y))


def mirror(x):
    return x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)


def test_patch_lifts_a_further_trained_base_on_the_finetuning_task():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    test_x, test_y = mirror(x[1200:]), y[1200:]
    rng = np.random.default_rng(0)
    init = {"hidden": {"kernel": jnp.asarray(rng.normal(0, 1 / 8, (64, 32)), jnp.float32),
                       "bias": jnp.zeros(32)},
            "out": {"kernel": jnp.asarray(rng.normal(0, 32 ** -0.5, (32, 10)), jnp.float32),
                    "bias": jnp.zeros(10)}}
    steps = jnp.zeros(100)
    old = fit(init, x[:300], y[:300], steps)
    finetuned = fit(old, mirror(x[300:600]), y[300:600], steps)          # the task: mirrored
    new = fit(old, x[600:1200], y[600:1200], jnp.zeros(200))              # the base, updated
    ported = portllm.port(new, portllm.patch_from_finetune(finetuned, old))
    scores = {name: accuracy(p, test_x, test_y) for name, p in
              dict(old=old, finetuned=finetuned, new=new, ported=ported).items()}
    # Measured: old 0.42, finetuned 0.94, new 0.42, ported 0.75.
    assert scores["ported"] > scores["new"] + 0.2, scores
    assert scores["finetuned"] > scores["ported"], scores


def test_bad_input_is_a_one_line_error():
    old = random_tree(0, SHAPES)
    patch = portllm.patch_from_finetune(random_tree(1, SHAPES), old)
    wrong = random_tree(2, {**SHAPES, "out/kernel": (5, 4)})
    headless = random_tree(1, {"body/dense/kernel": (6, 5), "body/dense/bias": (5,)})
    cases = [
        (lambda: portllm.port(wrong, patch),
         r"out/kernel has shape \(5, 3\); the new base has \(5, 4\)"),
        (lambda: portllm.patch_from_finetune(wrong, old),
         r"out/kernel: finetuned \(5, 4\) vs old_base \(5, 3\)"),
        (lambda: portllm.patch_from_finetune(headless, old), "finetuned has no 'out/kernel'"),
        (lambda: portllm.port(old, patch, rules=[("encoder/.*", 0.5)]),
         "PortLLM scale rule 'encoder/.*' matches no parameter; closest: "),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
