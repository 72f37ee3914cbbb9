"""FinerCut: a pruned model equals the original with those sublayers (and their norms) skipped,
for post-LN BERT, pre-LN ViT and RMSNorm Llama; its tree lacks exactly their params and its
config survives JSON; the greedy search removes first a sublayer whose removal changes nothing,
and under AxFormer's loss criterion the one whose removal costs least; bad names and counts are
one-line errors."""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import models, tree
from research.models import hf
from research.sparse import finercut as finercut_lib
from research.sparse.finercut import finercut, prune

SMALL = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, hidden_dropout=0.0,
             attention_dropout=0.0)
BUILDS = {"bert": ("bert_tiny_classifier", dict(vocab_size=100, max_length=32)),
          "vit": ("vit_tiny_classifier", {}),
          "llama": ("llama_tiny_lm", {})}
REMOVED = ("layer_0/mlp", "layer_1/attn")


def tiny(family, **overrides):
    name, extra = BUILDS[family]
    model = models.build(name, **{**SMALL, **extra, **overrides})
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32),
                          model.param_shapes())
    return model, params


def batch(model, rows=4, seed=0):
    rng = np.random.default_rng(seed)
    if model.family == "vit":
        return {"image": rng.normal(size=(rows, 28, 28, 1)).astype(np.float32),
                "label": rng.integers(0, 10, rows).astype(np.int32)}
    ids = rng.integers(1, 100, (rows, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    found = {"input_ids": ids, "attention_mask": mask}
    if model.task == "classification":
        found["label"] = rng.integers(0, 2, rows).astype(np.int32)
    return found


def inputs(model, found):
    return {k: v for k, v in found.items() if k in model.module.input_names}


def skipping(removed):
    """Run the original model with each removed sublayer adding nothing and its norm passing
    its input through: the reference a pruned model must equal."""
    def interceptor(next_fun, args, kwargs, context):
        where = "/".join(context.module.path[-2:])
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if where.endswith("_norm") and where[:-len("_norm")] in removed:
            return args[0]
        if where in removed:  # attention may compute only the first `rows` positions
            rows = args[3] if len(args) > 3 else kwargs.get("rows")
            x = args[0][:, :rows] if rows is not None else args[0]
            return jnp.zeros_like(x)
        return next_fun(*args, **kwargs)
    return nn.intercept_methods(interceptor)


@pytest.mark.parametrize("family", ["bert", "vit", "llama"])
def test_pruned_model_equals_original_with_sublayers_skipped(family):
    model, params = tiny(family)
    smaller_params, smaller = prune(params, model, REMOVED)
    found = inputs(model, batch(model))

    @jax.jit
    def outputs(full, pruned):
        with skipping(REMOVED):
            reference = model.module.apply({"params": full}, **found)
        return (reference, smaller.module.apply({"params": pruned}, **found),
                model.module.apply({"params": full}, **found))

    reference, pruned, original = outputs(params, smaller_params)
    np.testing.assert_allclose(pruned, reference, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(original) - np.asarray(pruned)).max() > 1e-2  # something went

    diff = tree.structural_diff(params, smaller_params)
    stack = "decoder" if family == "llama" else "encoder"
    expected = [p for p in tree.flatten(params)
                if p.startswith((f"{stack}/layer_0/mlp/", f"{stack}/layer_0/mlp_norm/",
                                 f"{stack}/layer_1/attn/", f"{stack}/layer_1/attn_norm/"))]
    assert diff == {"added": [], "removed": expected, "changed_shape": [], "changed_dtype": []}
    assert smaller.config.removed_sublayers == REMOVED
    tree.check_same_structure(smaller.param_shapes(), smaller_params)


def test_config_with_removed_sublayers_survives_json_but_not_hf_format(tmp_path):
    model, params = tiny("bert")
    smaller_params, smaller = prune(params, model, ["layer_1/attn", "layer_0/mlp"])
    assert smaller.config.removed_sublayers == REMOVED  # block order, whatever the input order
    text = json.dumps(dataclasses.asdict(smaller.config))
    assert models.make_config(**json.loads(text)) == smaller.config
    with pytest.raises(ValueError, match="cannot express removed_sublayers") as info:
        hf.save_pretrained(smaller, smaller_params, str(tmp_path / "hf"))
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("family, silent", [("vit", "layer_1/attn"), ("llama", "layer_0/mlp")])
def test_greedy_removes_first_the_sublayer_that_changes_nothing(family, silent):
    model, params = tiny(family)
    flat = tree.flatten(params)
    out = {"attn": "attn/out", "mlp": "mlp/down" if family == "llama" else "mlp/wo"}
    layer, sublayer = silent.split("/")
    for path in flat:  # its output projection is zero: the residual stream gets nothing
        if f"/{layer}/{out[sublayer]}/" in path:
            flat[path] = jnp.zeros_like(flat[path])
    removals = finercut(model, tree.unflatten(flat), [batch(model, seed=1), batch(model, seed=2)],
                        count=2)
    assert removals[0].sublayer == silent and removals[0].js < 1e-6
    assert removals[1].sublayer != silent and removals[1].js > 1e-4


def test_loss_criterion_removes_the_sublayer_whose_removal_costs_least():
    model, params = tiny("bert", num_layers=1)
    found = batch(model, rows=8, seed=3)
    removals = finercut(model, params, [found], count=2, criterion="loss")
    trials = {}  # (step, candidate) -> the pruned model and params
    for step, removal in enumerate(removals):
        done = [r.sublayer for r in removals[:step]]
        for name in finercut_lib.candidates(prune(params, model, done)[1].config):
            trials[step, name] = prune(params, model, [*done, name])

    @jax.jit
    def losses(pruned):  # one compile for every trial
        result = {}
        for (step, name), (_, smaller) in trials.items():
            logits = smaller.module.apply({"params": pruned[step, name]},
                                          **inputs(model, found))
            log_probs = jax.nn.log_softmax(logits)
            result[step, name] = -jnp.mean(log_probs[np.arange(8), found["label"]])
        return result

    result = losses({key: value[0] for key, value in trials.items()})
    for step, removal in enumerate(removals):
        options = {name: float(v) for (s, name), v in result.items() if s == step}
        assert removal.sublayer == min(options, key=options.get)
        np.testing.assert_allclose(removal.loss, options[removal.sublayer], rtol=1e-5)


def test_bad_names_and_counts_are_one_line_errors():
    model, params = tiny("bert")
    cases = [
        (lambda: prune(params, model, ["layer_2/attn"]),
         re.escape("removed_sublayers: 'layer_2/attn' is not layer_{i}/attn or layer_{i}/mlp "
                   "with 0 <= i < num_layers=2")),
        (lambda: prune(params, model, ["layer_0/ffn"]), "removed_sublayers: 'layer_0/ffn'"),
        (lambda: prune(params, model, ["layer_0/mlp", "layer_0/mlp"]), "names a sublayer twice"),
        (lambda: prune(*prune(params, model, ["layer_0/mlp"]), ["layer_0/mlp"]),
         "sublayer 'layer_0/mlp' is already removed"),
        (lambda: finercut(model, params, [], count=5), r"count=5 is outside \[1, 4\]"),
        (lambda: finercut(model, params, [], ratio=1.5), r"ratio=1.5 is outside \(0, 1\]"),
        (lambda: finercut(model, params, [], count=1, ratio=0.5), "exactly one of count"),
        (lambda: finercut(model, params, [], count=1, criterion="kl"), "criterion='kl'"),
        (lambda: finercut(model, params, [], count=1, rules=(("layer_7/.*", True),)),
         "finercut rule 'layer_7/.*' matches no"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
