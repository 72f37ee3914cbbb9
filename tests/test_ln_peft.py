"""LN-tuning in PEFT's format: our trained norms and head, exported, give PEFT's adapted
BertForSequenceClassification the same logits; a PEFT-made adapter imports into the same
function; only the norms and the head train; bad input is a one-line error."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from research import methods, models, peft_format, tree  # noqa: E402
from research.models import hf  # noqa: E402
from research.sparse import ln_peft  # noqa: E402

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0, num_classes=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = models.build("bert_tiny_classifier", **TINY)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32),
                          model.param_shapes())
    base_dir = str(tmp_path_factory.mktemp("ln_peft") / "base")
    hf.save_pretrained(model, params, base_dir)
    return model, params, base_dir


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, (3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask, np.zeros_like(ids)


def _ours(model, params, inputs):
    return np.asarray(jax.jit(model.module.apply)({"params": params}, *inputs))


def _theirs(torch_model, inputs):
    import torch

    ids, mask, types = (torch.tensor(x, dtype=torch.long) for x in inputs)
    with torch.no_grad():
        return torch_model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()


def _tuned(params, seed):
    """``params`` with every norm and the classifier moved, as training would."""
    rng = np.random.default_rng(seed)
    return tree.map_with_path(
        lambda p, x: x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
        if "norm/" in p or p.startswith("classifier/") else x, params)


def test_only_the_norms_and_the_head_train(tiny):
    model, params, _ = tiny
    method = methods.build({"name": "ln_tuning"})
    trainable = tree.resolve_rules([(r, True) for r in method.trainable_for(params)],
                                   list(tree.flatten(params)), default=False)
    assert {p for p, t in trainable.items() if t} == {
        p for p in tree.flatten(params) if "norm/" in p or p.startswith("classifier/")}


def test_exported_adapter_matches_peft_in_torch(tiny, tmp_path):
    import peft
    import transformers

    model, params, base_dir = tiny
    method = methods.build({"name": "ln_tuning"})
    tuned = _tuned(params, 1)
    config = ln_peft.export_ln_tuning_peft(method, tuned, model, str(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    saved = json.load(open(tmp_path / "adapter" / peft_format.ADAPTER_CONFIG))
    assert saved == config and saved["peft_type"] == "LN_TUNING"
    assert saved["target_modules"] == ["LayerNorm"] and saved["modules_to_save"] == ["classifier"]

    base = transformers.BertForSequenceClassification.from_pretrained(base_dir)
    torch_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    inputs = _inputs()
    theirs = _theirs(torch_model, inputs)
    assert np.abs(_ours(model, tuned, inputs) - theirs).max() < 1e-4
    # The untuned base differs, so the comparison above is not vacuous.
    assert np.abs(_ours(model, params, inputs) - theirs).max() > 1e-2

    again_method, again = ln_peft.import_ln_tuning_peft(str(tmp_path / "adapter"), model, params)
    for path, value in tree.flatten(tuned).items():
        np.testing.assert_allclose(tree.flatten(again)[path], value, atol=1e-7, err_msg=path)
    assert again_method.also_train == ("classifier/bias", "classifier/kernel")


def test_peft_created_adapter_imports(tiny, tmp_path):
    import peft
    import torch
    import transformers

    model, params, base_dir = tiny
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification.from_pretrained(base_dir)
    torch_model = peft.get_peft_model(base, peft.LNTuningConfig(
        target_modules=["LayerNorm"], modules_to_save=["classifier"]))
    with torch.no_grad():  # moved copies, as training would leave them
        for name, value in torch_model.named_parameters():
            if value.requires_grad:
                value.add_(torch.randn_like(value) * 0.3)
    torch_model.eval().save_pretrained(str(tmp_path / "adapter"))
    inputs = _inputs(seed=2)
    theirs = _theirs(torch_model, inputs)
    method, imported = ln_peft.import_ln_tuning_peft(str(tmp_path / "adapter"), model, params)
    assert method.name == "ln_tuning"
    assert np.abs(_ours(model, imported, inputs) - theirs).max() < 1e-4
    changed = {p for p, v in tree.flatten(imported).items()
               if not np.array_equal(v, tree.flatten(params)[p])}
    assert changed == {p for p in tree.flatten(params)
                       if "norm/" in p or p.startswith("classifier/")}


def test_bad_input_is_a_one_line_error(tiny, tmp_path):
    model, params, _ = tiny
    with pytest.raises(ValueError, match="method 'bitfit' is not 'ln_tuning'"):
        ln_peft.export_ln_tuning_peft(methods.build({"name": "bitfit"}), params, model,
                                      str(tmp_path / "a"))
    method = methods.build({"name": "ln_tuning"})
    ln_peft.export_ln_tuning_peft(method, params, model, str(tmp_path / "ok"))
    config_path = tmp_path / "ok" / peft_format.ADAPTER_CONFIG
    config = json.load(open(config_path))
    json.dump({**config, "peft_type": "LORA"}, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"peft_type='LORA'; only 'LN_TUNING' adapters import"):
        ln_peft.import_ln_tuning_peft(str(tmp_path / "ok"), model, params)
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        ln_peft.import_ln_tuning_peft(str(tmp_path / "missing"), model, params)
