"""mergekit configs run by Scion give mergekit's tensors (deterministic methods, within 1e-6)
or its statistics (random drops), on tiny random Llama and BERT checkpoints; bad configs and
inputs are one-line errors."""

import json
import os

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from research.merge import mergekit_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402


def _save(model_dir, tensors, config):
    os.makedirs(model_dir, exist_ok=True)
    save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(model_dir)


def _family(root, name, config, model_cls, count=3, scale=0.02, seed=0):
    """A random base and ``count`` fine-tunes (base + small noise) of one architecture."""
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    tensors = {k: v.detach().numpy().copy() for k, v in model_cls(config).state_dict().items()}
    rng = np.random.default_rng(seed)
    dirs = [os.path.join(root, f"{name}_base")]
    _save(dirs[0], tensors, config)
    for i in range(count):
        tuned = {k: (v + scale * rng.standard_normal(v.shape).astype(v.dtype)
                     if v.dtype.kind == "f" else v) for k, v in tensors.items()}
        dirs.append(os.path.join(root, f"{name}_ft{i}"))
        _save(dirs[-1], tuned, config)
    return dirs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mk_models"))
    llama = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=96, tie_word_embeddings=False)
    bert = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, vocab_size=96,
                                   max_position_embeddings=40)
    return {"llama": _family(root, "llama", llama, transformers.LlamaForCausalLM),
            "bert": _family(root, "bert", bert, transformers.BertModel, seed=1)}


@pytest.fixture(autouse=True)
def _mergekit_optional_alias_fix(monkeypatch):
    """mergekit 0.1.5 cannot plan an optional weight that has aliases (BERT's
    ``embeddings.position_ids``): it concatenates a list with a tuple. Hand it lists."""
    from mergekit.plan import MergePlanner

    plan_tensor = MergePlanner.plan_tensor

    def patched(self, weight, weights_in, *args, **kwargs):
        weights_in = [w.model_copy(update={"aliases": list(w.aliases)}) if w.aliases else w
                      for w in weights_in]
        return plan_tensor(self, weight, weights_in, *args, **kwargs)

    monkeypatch.setattr(MergePlanner, "plan_tensor", patched)


def _run_both(tmp_path, config: dict, seed=0):
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    ours, theirs = str(tmp_path / "scion"), str(tmp_path / "mergekit")
    mergekit_config.run(str(path), ours, seed=seed)
    mergekit_merge.run_merge(MergeConfiguration.model_validate(config), theirs,
                             options=MergeOptions(copy_tokenizer=False))
    return _load(ours), _load(theirs)


def _load(directory):
    tensors = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def _models(dirs, **params):
    return [{"model": d, "parameters": {k: (v[i] if isinstance(v, list) and len(v) == len(dirs)
                                            else v) for k, v in params.items()}}
            for i, d in enumerate(dirs)]


DETERMINISTIC = [
    ("linear", dict(weight=[0.5, 0.3, 0.2]), {}, False),
    ("linear", dict(weight=[1.0, 2.0, 0.5]), {"normalize": True}, False),
    ("task_arithmetic", dict(weight=[0.7, -0.3, 0.5]), {"lambda": 0.8}, True),
    ("ties", dict(weight=[1.0, 0.6, 0.8], density=[0.3, 0.5, 0.9]), {}, True),
    ("ties", dict(weight=[1.0, 0.6, 0.8], density=0.4), {"normalize": False, "lambda": 1.3},
     True),
    ("breadcrumbs", dict(weight=[1.0, 0.5, 0.5], density=0.6, gamma=0.05), {}, True),
    ("breadcrumbs_ties", dict(weight=[1.0, 0.5, 0.5], density=0.6, gamma=0.02), {}, True),
    ("model_stock", {}, {}, True),
    ("model_stock", {}, {"filter_wise": True}, True),
]


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method,model_params,params,with_base", DETERMINISTIC)
def test_deterministic_methods_match_mergekit(models, tmp_path, family, method, model_params,
                                              params, with_base):
    base, *tuned = models[family]
    config = {"merge_method": method, "dtype": "float32",
              "models": _models(tuned, **model_params)}
    if params:
        config["parameters"] = params
    if with_base:
        config["base_model"] = base
    ours, theirs = _run_both(tmp_path, config)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6, rtol=0, err_msg=name)


def test_gradients_filters_slerp_and_nuslerp_match_mergekit(models, tmp_path):
    base, a, b, _ = models["llama"]
    for config in [
        {"merge_method": "slerp", "base_model": base, "dtype": "float32",
         "models": [{"model": base}, {"model": a}],
         "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                              {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                              {"value": 0.5}]}},
        {"merge_method": "nuslerp", "dtype": "float32",
         "models": [{"model": a, "parameters": {"weight": 0.3}},
                    {"model": b, "parameters": {"weight": [0.2, 0.9]}}]},
        {"merge_method": "nuslerp", "base_model": base, "dtype": "float32",
         "models": [{"model": a, "parameters": {"weight": 0.3}},
                    {"model": b, "parameters": {"weight": 0.7}}],
         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        {"merge_method": "ties", "base_model": base, "dtype": "float32",
         "models": [{"model": a, "parameters": {"weight": [0.0, 1.0], "density": 0.5}},
                    {"model": b, "parameters": {"weight": 1.0,
                                                "density": [{"filter": "mlp", "value": 0.2},
                                                            {"value": 0.7}]}}]},
    ]:
        ours, theirs = _run_both(tmp_path, config)
        for name in theirs:
            np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6, rtol=0,
                                       err_msg=f"{config['merge_method']} {name}")


def test_passthrough_slices_stack_layers_like_mergekit(models, tmp_path):
    base, a, *_ = models["llama"]
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": base, "layer_range": [0, 3]}]},
                         {"sources": [{"model": a, "layer_range": [1, 4]}]}]}
    ours, theirs = _run_both(tmp_path, config)
    assert ours.keys() == theirs.keys()
    assert "model.layers.5.mlp.up_proj.weight" in ours
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    source = _load(a)
    np.testing.assert_array_equal(ours["model.layers.3.mlp.up_proj.weight"],
                                  source["model.layers.1.mlp.up_proj.weight"])
    with open(tmp_path / "scion" / "config.json") as file:
        assert json.load(file)["num_hidden_layers"] == 6
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "scion"))
    assert len(loaded.model.layers) == 6


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della_linear"])
def test_random_drops_keep_density_and_l1_norm(models, tmp_path, method):
    """One model against the base: the kept fraction of the task vector is the density and the
    rescaled task vector keeps its L1 norm, in Scion's output as in mergekit's."""
    base, a, *_ = models["llama"]
    density = 0.3
    config = {"merge_method": method, "base_model": base, "dtype": "float32",
              "models": [{"model": a, "parameters": {"weight": 1.0, "density": density}}]}
    ours, theirs = _run_both(tmp_path, config, seed=3)
    base_t, tuned = _load(base), _load(a)
    name = "model.layers.2.mlp.down_proj.weight"
    delta = tuned[name] - base_t[name]
    for result in (ours, theirs):
        merged = result[name] - base_t[name]
        kept = np.abs(merged) > 1e-7
        assert abs(kept.mean() - density) < 0.03
        np.testing.assert_allclose(np.abs(merged).sum(), np.abs(delta).sum(), rtol=1e-3)
        # The kept entries are the task vector's, scaled by one common factor.
        ratio = merged[kept] / delta[kept]
        np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-3)


def test_seeded_drops_are_reproducible(models, tmp_path):
    base, a, b, _ = models["bert"]
    config = {"merge_method": "dare_ties", "base_model": base,
              "models": _models([a, b], weight=[1.0, 1.0], density=0.5)}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    outs = []
    for i, seed in enumerate((1, 1, 2)):
        mergekit_config.run(str(path), str(tmp_path / f"o{i}"), seed=seed)
        outs.append(_load(str(tmp_path / f"o{i}")))
    name = "encoder.layer.1.output.dense.weight"
    np.testing.assert_array_equal(outs[0][name], outs[1][name])
    assert not np.array_equal(outs[0][name], outs[2][name])


def _error(tmp_path, config) -> str:
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(config) if isinstance(config, dict) else config)
    with pytest.raises(ValueError) as err:
        mergekit_config.run(str(path), str(tmp_path / "out"))
    message = str(err.value)
    assert "\n" not in message
    assert not os.path.exists(tmp_path / "out")
    return message


def test_bad_configs_and_inputs_are_one_line_errors(models, tmp_path):
    base, a, b, _ = models["llama"]
    bert = models["bert"][1]
    assert "allowed: linear" in _error(tmp_path, {"merge_method": "tie", "models": [{"model": a}]})
    assert "allowed: weight, density" in _error(tmp_path, {
        "merge_method": "ties", "base_model": base, "models": _models([a], weight=1.0, densty=1)})
    assert "not 1" in _error(tmp_path, {"merge_method": "linear",
                                        "parameters": {"normalize": False},
                                        "models": _models([a, b], weight=[0.5, 0.7])})
    assert "no tensor" in _error(tmp_path, {"merge_method": "linear",
                                            "models": _models([a, bert], weight=[0.5, 0.5])})
    assert "needs a base model" in _error(tmp_path, {"merge_method": "ties",
                                                     "models": _models([a], weight=1.0)})
    assert "'self_atn' matches no tensor" in _error(tmp_path, {
        "merge_method": "linear", "models": _models([a, b], weight=[
            [{"filter": "self_atn", "value": 1.0}, {"value": 0.5}], 0.5])})
    # The YAML is read safely: a Python tag is refused, not run.
    assert "cannot read the merge config" in _error(
        tmp_path, "merge_method: linear\nmodels: !!python/object/apply:os.system ['true']\n")
    # NaN in one input tensor: named, and nothing is written.
    broken = str(tmp_path / "broken")
    tensors = _load(a)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = np.nan
    _save(broken, tensors, transformers.AutoConfig.from_pretrained(a))
    message = _error(tmp_path, {"merge_method": "linear",
                                "models": _models([a, broken], weight=[0.5, 0.5])})
    assert "model.layers.1.mlp.up_proj.weight" in message and "NaN" in message


def test_shape_mismatch_names_the_tensor(models, tmp_path):
    base, a, *_ = models["llama"]
    wide = str(tmp_path / "wide")
    tensors = _load(a)
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((65, 32), np.float32)
    _save(wide, tensors, transformers.AutoConfig.from_pretrained(a))
    message = _error(tmp_path, {"merge_method": "linear",
                                "models": _models([a, wide], weight=[0.5, 0.5])})
    assert message.startswith("model.layers.0.mlp.up_proj.weight: shape [65, 32]")


def test_cli_merges_and_reports_bad_input_in_one_line(models, tmp_path, capsys):
    from launch import merge as merge_cli

    base, a, b, _ = models["bert"]
    path = tmp_path / "ok.yml"
    path.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": base,
                                    "models": _models([a, b], weight=1.0, density=0.5)}))
    assert merge_cli.main([str(path), str(tmp_path / "out")]) == 0
    assert transformers.BertModel.from_pretrained(str(tmp_path / "out")) is not None
    capsys.readouterr()
    path.write_text(yaml.safe_dump({"merge_method": "slerpy", "models": [{"model": a}]}))
    assert merge_cli.main([str(path), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown merge method 'slerpy'") and "\n" not in err
