"""The method seam: every registered method builds, prepares, inits, applies and exports; its
export is the function it trains (the plain model on the exported params gives the method's
outputs); names resolve, and unknown names and options are one-line errors."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from research import methods, models, tree
from research.sparse import delta as delta_lib
from research.train import optim

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0, num_classes=3)
KERNELS = ((r"encoder/.*/attn/(query|value)/kernel", 2),)
# What each method whose leaves cannot fold keeps in its export.
KEPT = {"dept": {"embeddings/prompt"}, "prompt_tuning": {"embeddings/prompt"},
        "p_tuning": {"embeddings/prompt"},
        "prefix_tuning": {f"encoder/layer_{i}/attn/{kv}/prefix" for i in (0, 1)
                          for kv in ("key", "value")},
        "houlsby": {f"encoder/layer_{i}/{site}/adapter/{part}/{leaf}" for i in (0, 1)
                    for site in ("attn/out", "mlp/wo") for part in ("down", "up")
                    for leaf in ("kernel", "bias")},
        "pfeiffer": {f"encoder/layer_{i}/mlp/wo/adapter/{part}/{leaf}" for i in (0, 1)
                     for part in ("down", "up") for leaf in ("kernel", "bias")},
        "diffscaler": {f"encoder/layer_{i}/{site}/diffscaler/{part}" for i in (0, 1)
                       for site in ("attn/query", "attn/key", "attn/value", "attn/out",
                                    "mlp/wi", "mlp/wo") for part in ("down", "up")},
        "panda": {"embeddings/prompt"},
        "iapt": {f"iapt/layer_{i}/{leaf}" for i in (0, 1) for leaf in (
            "down/kernel", "down/bias", "queries", "rational/numerator", "rational/denominator",
            "up/kernel", "up/bias")},
        "pet": {f"mlm/{leaf}" for leaf in ("transform/kernel", "transform/bias",
                                           "transform_norm/scale", "transform_norm/bias",
                                           "bias")}}
# One task's export of a multi-task method is its plain adapters plus that task's head.
KEPT["polyhistor"] = KEPT["shared_adapter"] = KEPT["houlsby"]
# The narrow blocks of the side networks (side-tuning, LEVI), one per tapped layer.
SIDE_BLOCKS = {f"layer_{i}/{module}/{leaf}" for i in (0, 1)
               for module, weight in (("attn/query", "kernel"), ("attn/key", "kernel"),
                                      ("attn/value", "kernel"), ("attn/out", "kernel"),
                                      ("mlp/wi", "kernel"), ("mlp/wo", "kernel"),
                                      ("attn_norm", "scale"), ("mlp_norm", "scale"))
               for leaf in (weight, "bias")}
KEPT["side_tuning"] = {f"side_tuning/{p}" for p in SIDE_BLOCKS | {
    f"{m}/{leaf}" for m in ("down_0", "down_1", "up") for leaf in ("kernel", "bias")} | {
    "norm/scale", "norm/bias"}}
KEPT["vqt"] = {"vqt/queries", "vqt/head/kernel"}
KEPT["levi"] = {f"levi/{p}" for p in SIDE_BLOCKS | {
    f"{m}/{leaf}" for m in ("embed", "adapt_0", "adapt_1") for leaf in ("kernel", "bias")} | {
    "mix"}}


def _model():
    return models.build("bert_tiny_classifier", **TINY)


def _random(shapes, seed, scale=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype), shapes)


def _options(name: str, tmp_path) -> dict:
    """The options each registered method is built with here; a method without an entry
    fails the test below, so a new method cannot skip it."""
    model = _model()
    if name == "sparse":
        mask = {p: np.zeros(s.shape, bool) for p, s in tree.flatten(model.param_shapes()).items()}
        mask["encoder/layer_0/mlp/wi/kernel"][::7, ::5] = True
        path = str(tmp_path / "mask.safetensors")
        delta_lib.save(delta_lib.from_mask(tree.unflatten(mask), model.param_shapes()), path)
        return dict(mask=path)
    if name == "pet":  # a vocabulary that fits the tiny model, one verbaliser word a class
        path = tmp_path / "vocab.txt"
        path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "it", "was", ".",
                                   "bad", "fine", "great"] + [f"w{i}" for i in range(89)]) + "\n")
        return dict(verbalizer=("bad", "fine", "great"), vocab=str(path))
    if name == "graft":
        os.makedirs(tmp_path / "finetuned" / "checkpoints", exist_ok=True)
        return dict(finetuned=str(tmp_path / "finetuned"), density=0.05)
    return {
        "full": {}, "bitfit": {}, "ln_tuning": {}, "lightweight": {}, "last_layer": {},
        "hft": {}, "sparse_reg": {}, "mask_tuning": {},
        "lora": dict(targets=KERNELS), "dora": dict(targets=KERNELS),
        "qlora": dict(targets=KERNELS, block_size=16), "ia3": {},
        "vera": dict(rank=4), "loha": dict(targets=KERNELS), "lokr": dict(targets=KERNELS),
        "pela": dict(targets=KERNELS), "pego": dict(targets=KERNELS, modules=2),
        "dept": dict(prompt_length=3, rank=2),
        "prompt_tuning": dict(num_virtual_tokens=3),
        "p_tuning": dict(num_virtual_tokens=3, encoder_hidden_size=8),
        "prefix_tuning": dict(num_virtual_tokens=3),
        "houlsby": {}, "pfeiffer": {}, "ssf": {}, "diffscaler": {},
        "iapt": dict(num_virtual_tokens=3, bottleneck=4),
        "side_tuning": dict(width=8, heads=2), "vqt": dict(num_queries=2),
        "levi": dict(width=8, heads=2),
        "polyhistor": dict(tasks=("a", "b"), template=(8, 1)),
        "shared_adapter": dict(tasks=("a", "b")),
        # The seam test's checkpoint reader gives a tree without a prompt: PANDA's teacher
        # prompt comes as leaves.
        "panda": dict(source="source_run", num_virtual_tokens=3,
                      source_leaves={"embeddings/prompt": np.full((3, 32), 0.1, np.float32)}),
        "adalora": dict(targets=(r"encoder/.*/attn/(query|value)/kernel",), init_r=4, target_r=2,
                        total_step=10),
        "multi_lora": dict(adapters=("a", "b"), lora=dict(targets=KERNELS)),
        "green": dict(selected=(r"encoder/layer_1/mlp/wo/kernel",)),
        "s2ft": dict(heads=1, channels=0.25),
        "subspace": dict(dim=16),
    }[name]


def test_every_registered_method_exports_the_function_it_trains(tmp_path):
    model = _model()
    base = _random(model.param_shapes(), 0)
    ids = np.random.default_rng(1).integers(1, 100, (2, 7)).astype(np.int32)
    inputs = (ids, np.ones_like(ids), np.zeros_like(ids))
    finetuned = _random(model.param_shapes(), 2)
    context = methods.Context(None, model, lambda: base, lambda: iter(()),
                              lambda workdir, key="": finetuned)
    registry = methods.registry()
    assert {"full", "lora", "graft", "green"} <= set(registry)
    for name in registry:
        method = methods.build({"name": name, **_options(name, tmp_path)}).prepare(context)
        params = method.init(jax.random.key(0), base)
        # Move every trainable leaf, so a method leaf export ignores would show.
        trainable = optim.trainable_mask(params, (), method.trainable_for(params))
        moved = jax.tree.map(
            lambda x, t, n: x + 0.05 * n.astype(x.dtype)
            if t and jnp.issubdtype(x.dtype, jnp.floating) else x,
            params, trainable, _random(params, 3, scale=1.0))
        outputs = method.apply(model.module, {"params": moved}, *inputs).outputs
        exported = method.export(moved)
        extra = set(tree.flatten(exported)) - set(tree.flatten(base))
        assert set(tree.flatten(base)) <= set(tree.flatten(exported)), name
        if name in KEPT:  # leaves that cannot fold into the model stay beside it
            assert extra == KEPT[name], (name, sorted(extra))
            if name != "dept":  # DePT's export folds its low-rank part, keeping the prompt
                # P-tuning's export is its encoder's output, a plain prompt; a multi-task
                # method's is one task's plain adapters.
                runner = (method.as_prompt_tuning() if name == "p_tuning" else
                          method.as_adapters() if name in ("polyhistor", "shared_adapter")
                          else method)
                kept = runner.apply(model.module, {"params": exported}, *inputs).outputs
                np.testing.assert_allclose(kept, outputs, atol=2e-4, err_msg=name)
            continue
        assert not extra, (name, sorted(extra)[:3])
        plain = model.module.apply({"params": exported}, *inputs)
        np.testing.assert_allclose(plain, outputs, atol=2e-4, err_msg=name)


def test_registry_names_one_factory_each():
    registry = methods.registry()
    with pytest.raises(ValueError, match="method name 'lora' is registered twice"):
        methods.register("lora")(type("Impostor", (methods.Method,), {}))
    assert methods.registry() == registry


def test_full_fine_tuning_is_the_default():
    method = methods.build(None)
    assert isinstance(method, methods.Method) and method.trainable is None
    params = {"a": 1}
    assert method.init(None, params) is params and method.export(params) is params


def test_unknown_method_and_option_are_one_line_errors():
    with pytest.raises(ValueError, match=r"config.method.name='lorra' is not one of \["):
        methods.build(ml_collections.ConfigDict({"name": "lorra"}))
    with pytest.raises(ValueError, match="config.method for 'full'.*rank"):
        methods.build(ml_collections.ConfigDict({"name": "full", "rank": 8}))
