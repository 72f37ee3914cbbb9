"""Prompt tuning, P-tuning and prefix tuning: prompt rows sit before the input (the model on a
prompt of word rows is the plain model on those ids in front) and the mask grows; P-tuning's
encoder is its MLP and its export is prompt tuning; a Llama's prefixes are a past key/value
cache (the plain model's own keys and values of real tokens reproduce it); one BERT layer
against numpy; only the method's leaves train; PEFT adapters match ``peft`` in torch both ways;
bad input is a one-line error and a failed export leaves the old folder whole."""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402

from research import methods, models, peft_format, sites, tree  # noqa: E402
from research.adapters import prefix as prefix_lib  # noqa: E402
from research.adapters import prompts  # noqa: E402
from research.adapters.prefix import PrefixTuning  # noqa: E402
from research.adapters.prompts import PromptTuning, PTuning  # noqa: E402
from research.models import hf  # noqa: E402
from research.models.layers import rotate  # noqa: E402
from research.train import loop  # noqa: E402
from tests.tiny_bert import (  # noqa: E402
    TINY, random_params, gap, one_line, loop_config, loop_setup, random_batch,
    assert_only_trainable_moved
)

LLAMA = dict(vocab_size=100, hidden_size=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
             num_layers=2, max_length=64)
HEAD = (r"classifier/.*",)
N = 3


def token_batch(rows=3, length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), np.int32)
    mask[1, 8:] = 0
    types = np.zeros_like(ids)
    types[:, 6:] = 1
    return ids, mask, types


def run(model, method, params, *inputs):
    if method is None:
        return model.module.apply({"params": params}, *inputs)
    return method.apply(model.module, {"params": params}, *inputs).outputs


def with_leaves(params, leaves: dict):
    return tree.unflatten({**tree.flatten(params), **leaves})


@pytest.fixture(scope="module")
def bert():
    model = models.build("bert_tiny_classifier", **TINY)
    return model, random_params(model)


@pytest.fixture(scope="module")
def bert_encoder(bert):
    model = models.build("bert_tiny_encoder", **TINY)
    params = {k: v for k, v in bert[1].items() if k != "classifier"}
    return model, params


@pytest.fixture(scope="module")
def llama():
    model = models.build("llama_tiny_lm", **LLAMA)
    return model, random_params(model, seed=3)


# ---------------------------------------------------------------------------------------------
# Defining properties
# ---------------------------------------------------------------------------------------------


def test_prompt_rows_sit_before_the_input_and_the_mask_grows(bert_encoder):
    """A prompt made of word-table rows is the plain model with those ids in front, token type
    0, mask 1: positions, types, mask and pooler (the first virtual token) all line up."""
    model, params = bert_encoder
    method = PromptTuning(num_virtual_tokens=4)
    words = np.array([5, 17, 42, 99])
    prompt = params["embeddings"]["word"]["embedding"][words]
    adapted = with_leaves(params, {method.prompt_path: prompt})
    ids, mask, types = token_batch()
    front = np.broadcast_to(words, (3, 4)).astype(np.int32)
    for given, grown in ((mask, np.concatenate([np.ones((3, 4), np.int32), mask], 1)),
                         (None, None)):
        ours = run(model, method, adapted, ids, given, types)
        plain = run(model, None, params, np.concatenate([front, ids], 1), grown,
                    np.concatenate([np.zeros_like(front), types], 1))
        assert ours[0].shape == (3, 4 + 12, 32)  # the encoder's output keeps the prompt rows
        assert gap(ours[0], plain[0]) < 1e-5 and gap(ours[1], plain[1]) < 1e-5


def test_leaves_axes_init_and_what_trains(bert):
    model, params = bert
    shapes = model.param_shapes()
    word = np.asarray(params["embeddings"]["word"]["embedding"])

    method = PromptTuning(num_virtual_tokens=5, also_train=HEAD)
    prompt = np.asarray(method.init(jax.random.key(0), params)["embeddings"]["prompt"])
    assert prompt.shape == (5, 32)
    assert all(np.any(np.all(word == row, axis=1)) for row in prompt)  # vocabulary rows
    drawn = PromptTuning(prompt_init="random").init(jax.random.key(0), params)
    drawn = drawn["embeddings"]["prompt"]
    assert 0.8 < float(np.std(drawn)) < 1.2
    assert method.trainable == (r"embeddings/prompt", *HEAD)

    added = {p: v.shape for p, v in tree.flatten(jax.eval_shape(
        PrefixTuning(num_virtual_tokens=N).init, jax.random.key(0), shapes)).items()
        if p not in tree.flatten(shapes)}
    assert added == {f"encoder/layer_{i}/attn/{side}/prefix": (N, 4, 8)
                     for i in range(2) for side in ("key", "value")}
    prefix = PrefixTuning(num_virtual_tokens=N, also_train=HEAD)
    logical = tree.flatten(prefix.logical_axes(model.logical_axes(), tree.unflatten(
        {**tree.flatten(shapes), **added})))
    assert logical["encoder/layer_1/attn/value/prefix"] == (None, "kv_heads", "head_dim")
    assert prefix.table_width(shapes) == 2 * 2 * 32
    for path in added:
        assert any(re.fullmatch(r, path) for r in prefix.trainable)

    p_tuning = PTuning(num_virtual_tokens=N, encoder_hidden_size=16)
    leaves = {p: v.shape for p, v in tree.flatten(jax.eval_shape(
        p_tuning.init, jax.random.key(0), shapes)).items() if "prompt_encoder" in p}
    assert leaves == {"embeddings/prompt_encoder/embedding": (N, 32),
                      "embeddings/prompt_encoder/mlp_0/kernel": (32, 16),
                      "embeddings/prompt_encoder/mlp_0/bias": (16,),
                      "embeddings/prompt_encoder/mlp_1/kernel": (16, 16),
                      "embeddings/prompt_encoder/mlp_1/bias": (16,),
                      "embeddings/prompt_encoder/mlp_2/kernel": (16, 32),
                      "embeddings/prompt_encoder/mlp_2/bias": (32,)}


def test_p_tuning_encoder_is_its_mlp_and_its_export_is_prompt_tuning(bert):
    model, params = bert
    method = PTuning(num_virtual_tokens=N, encoder_hidden_size=16, also_train=HEAD)
    adapted = method.init(jax.random.key(2), params)
    f = {p: np.asarray(v, np.float64) for p, v in tree.flatten(adapted).items()}
    e = "embeddings/prompt_encoder"
    hidden = np.maximum(f[f"{e}/embedding"] @ f[f"{e}/mlp_0/kernel"] + f[f"{e}/mlp_0/bias"], 0)
    hidden = np.maximum(hidden @ f[f"{e}/mlp_1/kernel"] + f[f"{e}/mlp_1/bias"], 0)
    want = hidden @ f[f"{e}/mlp_2/kernel"] + f[f"{e}/mlp_2/bias"]
    assert gap(method.prompt(tree.flatten(adapted)), want) < 1e-5

    exported = method.export(adapted)
    assert set(tree.flatten(exported)) == set(tree.flatten(params)) | {"embeddings/prompt"}
    ids, mask, types = token_batch()
    ours = run(model, method, adapted, ids, mask, types)
    again = run(model, method.as_prompt_tuning(), exported, ids, mask, types)
    assert gap(ours, again) < 1e-6
    assert gap(ours, run(model, None, params, ids, mask, types)) > 1e-3


def test_llama_prefixes_are_a_past_cache_of_real_tokens(llama):
    """With every layer's prefix set to the keys (rotated, as HF caches them) and values the
    plain model computes for tokens ``p``, the model on ``x`` is the plain model on ``[p; x]``:
    the real tokens rotate from position n, the prefix is not rotated again, causal row i sees
    every prefix, the mask grows. GQA: 2 key/value heads for 4 query heads."""
    model, params = llama
    words = np.array([[7, 3, 61]], np.int32)
    features = {}
    paths = {f"decoder/layer_{i}/attn/{side}" for i in range(2) for side in ("key", "value")}
    with sites.capture(paths, features):
        model.module.apply({"params": params}, words)
    leaves = {f"{path}/prefix": (rotate(features[path], model.config.rope_theta)
                                 if path.endswith("key") else features[path])[0]
              for path in paths}
    method = PrefixTuning(num_virtual_tokens=N, encoder="decoder")
    adapted = with_leaves(params, leaves)
    ids, mask, _ = token_batch()
    front = np.broadcast_to(words, (3, N))
    for given, grown in ((None, None),
                         (mask, np.concatenate([np.ones((3, N), np.int32), mask], 1))):
        ours = run(model, method, adapted, ids, given)
        plain = run(model, None, params, np.concatenate([front, ids], 1), grown)[:, N:]
        assert ours.shape == (3, 12, 100) and gap(ours, plain) < 1e-4
    # A scanned stack (one traced block for every layer) carries the prefixes the same way.
    scanned = models.build("llama_tiny_lm", **LLAMA, scan_layers=True)
    assert gap(run(scanned, method, adapted, ids, mask), ours) < 1e-5


def test_bert_prefix_one_layer_against_numpy(bert_encoder):
    """Layer 0's attention with prefixes, and the embeddings at positions n.., by hand."""
    model, params = bert_encoder
    method = PrefixTuning(num_virtual_tokens=N)
    adapted = method.init(jax.random.key(4), params)
    ids, mask, types = token_batch()
    seen = {}

    def record(call):
        seen[call.path] = (call.inputs, out := call.output())
        return out
    with sites.intercept(record, sites.at({"embeddings", "encoder/layer_0/attn"})):
        run(model, method, adapted, ids, mask, types)

    f = {p: np.asarray(v, np.float64) for p, v in tree.flatten(adapted).items()}
    summed = (f["embeddings/word/embedding"][ids] + f["embeddings/token_type/embedding"][types]
              + f["embeddings/position/embedding"][N:N + 12])
    centred = summed - summed.mean(-1, keepdims=True)
    normed = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-12)
    embedded = normed * f["embeddings/norm/scale"] + f["embeddings/norm/bias"]
    assert gap(seen["embeddings"][1], embedded) < 1e-5

    x = np.asarray(seen["encoder/layer_0/attn"][0], np.float64)
    a = "encoder/layer_0/attn"
    def project(side):
        return np.einsum("ble,ehd->blhd", x, f[f"{a}/{side}/kernel"]) + f[f"{a}/{side}/bias"]
    query = project("query")
    key = np.concatenate([np.broadcast_to(f[f"{a}/key/prefix"], (3, N, 4, 8)),
                          project("key")], 1)
    value = np.concatenate([np.broadcast_to(f[f"{a}/value/prefix"], (3, N, 4, 8)),
                            project("value")], 1)
    scores = np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(8)
    grown = np.concatenate([np.ones((3, N)), mask], 1)
    scores = np.where(grown[:, None, None, :] > 0, scores, -1e30)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = np.einsum("bhqk,bkhd->bqhd", weights, value)
    want = np.einsum("bqhd,hde->bqe", context, f[f"{a}/out/kernel"]) + f[f"{a}/out/bias"]
    assert gap(seen[a][1], want) < 1e-5


@pytest.mark.parametrize("options", [
    dict(name="prompt_tuning", num_virtual_tokens=4),
    dict(name="p_tuning", num_virtual_tokens=4, encoder_hidden_size=8),
    dict(name="prefix_tuning", num_virtual_tokens=4)], ids=lambda o: o["name"])
def test_training_under_the_loop_moves_only_the_method_leaves(options):
    setup, state = loop_setup(loop_config(dict(options, also_train=HEAD)))
    before = jax.device_get(state)
    trainable = tree.flatten(before["trainable"])
    own = {"prompt_tuning": {"embeddings/prompt"},
           "p_tuning": {f"embeddings/prompt_encoder/{leaf}" for leaf in (
               "embedding", "mlp_0/kernel", "mlp_0/bias", "mlp_1/kernel", "mlp_1/bias",
               "mlp_2/kernel", "mlp_2/bias")},
           "prefix_tuning": {"encoder/layer_0/attn/key/prefix",
                             "encoder/layer_0/attn/value/prefix"}}[options["name"]]
    assert set(trainable) == own | {"classifier/kernel", "classifier/bias"}
    batch = random_batch(setup)
    state, _ = loop.make_train_step(setup)(state, batch)
    assert_only_trainable_moved(before, jax.device_get(state))


def test_config_files_build_the_methods():
    from configs import minilm_p_tuning, minilm_prefix_tuning, minilm_prompt_tuning

    shapes = models.build("minilm_l6_classifier", num_classes=2).param_shapes()
    for config_file, kind in ((minilm_prompt_tuning, PromptTuning), (minilm_p_tuning, PTuning),
                              (minilm_prefix_tuning, PrefixTuning)):
        config = config_file.get_config("quick")
        method = methods.build(config.method)
        assert type(method) is kind and config.train.steps == 4
        assert method.num_virtual_tokens == 20 and method.also_train == HEAD
        added = tree.flatten(jax.eval_shape(method.init, jax.random.key(0), shapes))
        assert sum(int(np.prod(added[p].shape)) for p in added
                   if any(re.fullmatch(r, p) for r in method.own_leaves())) == {
            PromptTuning: 20 * 384,
            PTuning: 20 * 384 + 384 * 128 + 128 + 128 * 128 + 128 + 128 * 384 + 384,
            PrefixTuning: 20 * 6 * 2 * 384}[kind]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_a_one_line_error(bert, llama, tmp_path):
    model, params = bert
    for name, cls in (("prompt_tuning", PromptTuning), ("p_tuning", PTuning),
                      ("prefix_tuning", PrefixTuning)):
        with pytest.raises(ValueError, match=rf"^{name} num_virtual_tokens=0 is not a positive "
                                             rf"integer$"):
            cls(num_virtual_tokens=0)
        with pytest.raises(ValueError, match=rf"{name} num_virtual_tokens=0 is not"):
            methods.build(dict(name=name, num_virtual_tokens=0))
    with pytest.raises(ValueError, match="config.method for 'prefix_tuning'.*rank"):
        methods.build(dict(name="prefix_tuning", rank=4))
    with pytest.raises(ValueError, match=r"^prefix_tuning prefix_projection=True is not "
                                         r"supported \(only False"):
        PrefixTuning(prefix_projection=True)

    # Prefix tuning where there is no attention: the wrong stack, or a model without one.
    with pytest.raises(ValueError, match=r"^prefix_tuning encoder='decoder' holds no attention "
                                         r"\(no decoder/layer_\{i\}/attn/key and value "
                                         r"kernels\); closest: encoder/layer_0/attn/key/kernel"
                       ) as info:
        PrefixTuning(encoder="decoder").init(jax.random.key(0), params)
    one_line(info)
    with pytest.raises(ValueError, match=r"^prefix_tuning encoder='encoder' holds no attention"
                       ) as info:
        PrefixTuning().init(jax.random.key(0), llama[1])
    one_line(info)
    mlp_only = {"encoder": {"layer_0": {"mlp": {"wi": {"kernel": jnp.zeros((4, 8))}}}}}
    with pytest.raises(ValueError, match=r"^prefix_tuning encoder='encoder' holds no attention"):
        PrefixTuning().init(jax.random.key(0), mlp_only)
    ids, mask, types = token_batch()
    adapted = PrefixTuning(num_virtual_tokens=N).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"^prefix_tuning positions='embeddings/pos/embedding' "
                                         r"is not a parameter \(None: leave positions alone\); "
                                         r"closest: embeddings/position/embedding") as info:
        run(model, PrefixTuning(num_virtual_tokens=N, positions="embeddings/pos/embedding"),
            adapted, ids, mask, types)
    one_line(info)
    with pytest.raises(ValueError, match=r"prefix 'encoder/layer_0/attn/key/prefix' is not in "
                                         r"the params \(run init first\)"):
        run(model, PrefixTuning(num_virtual_tokens=N), params, ids, mask, types)
    with pytest.raises(ValueError, match=r"the params' encoder/layer_0/attn/key/prefix is "
                                         r"\(3, 4, 8\), not \(5, 4, 8\)"):
        run(model, PrefixTuning(num_virtual_tokens=5), adapted, ids, mask, types)
    long = np.ones((1, 30), np.int32)
    with pytest.raises(ValueError, match=r"sequence length 30 plus num_virtual_tokens=3 exceeds "
                                         r"the model's max_length=32"):
        run(model, PrefixTuning(num_virtual_tokens=N), adapted, long, long, 0 * long)
    with pytest.raises(ValueError, match=r"^prompt_tuning embedding='embeddings/wrd/embedding' "
                                         r"is not a parameter; closest: embeddings/word/"):
        PromptTuning(embedding="embeddings/wrd/embedding").init(jax.random.key(0), params)

    # PEFT folders that do not fit.
    method = PrefixTuning(num_virtual_tokens=N, also_train=HEAD)
    prompts.export_prompt_peft(method, adapted, model, str(tmp_path / "a"))
    config_path = tmp_path / "a" / peft_format.ADAPTER_CONFIG
    config = json.load(open(config_path))
    for change, message in (
            (dict(peft_type="LORA"), r"peft_type='LORA' is not one of \('PROMPT_TUNING', "
                                     r"'P_TUNING', 'PREFIX_TUNING'\)"),
            (dict(prefix_projection=True), r"prefix_projection=True is not supported"),
            (dict(num_virtual_tokens=0), r"num_virtual_tokens=0 is not a positive integer"),
            (dict(num_layers=3), r"num_layers=3 does not fit this model, which needs 2"),
            (dict(num_attention_heads=2), r"num_attention_heads=2 does not fit this model, "
                                          r"which needs 4")):
        json.dump({**config, **change}, open(config_path, "w"))
        with pytest.raises(ValueError, match=rf"a/adapter_config.json: {message}") as info:
            prompts.import_prompt_peft(str(tmp_path / "a"), model, params)
        one_line(info)
    json.dump({**config, "num_virtual_tokens": 4}, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"a/adapter_model.safetensors: prompt_embeddings "
                                         r"\(3, 128\) does not fit num_virtual_tokens=4 and this "
                                         r"model's 2 layers of key/value heads \(4, 128\)"):
        prompts.import_prompt_peft(str(tmp_path / "a"), model, params)
    json.dump(config, open(config_path, "w"))
    wider = models.build("bert_tiny_classifier", **{**TINY, "num_classes": 3})
    with pytest.raises(ValueError, match=r"tensor 'base_model.classifier.bias' \(2,\) does not "
                                         r"fit this model's classifier/bias \(3,\), which needs "
                                         r"\(3,\)") as info:
        prompts.import_prompt_peft(str(tmp_path / "a"), wider, random_params(wider))
    one_line(info)
    with pytest.raises(FileNotFoundError, match=r"nowhere/adapter_config.json does not exist"):
        prompts.import_prompt_peft(str(tmp_path / "nowhere"), model, params)


def test_a_failed_export_leaves_the_old_folder_whole(bert, tmp_path, monkeypatch):
    model, params = bert
    method = PromptTuning(num_virtual_tokens=N, also_train=HEAD)
    prompts.export_prompt_peft(method, method.init(jax.random.key(0), params), model,
                               str(tmp_path / "adapter"))
    before = {name: open(tmp_path / "adapter" / name, "rb").read()
              for name in os.listdir(tmp_path / "adapter")}
    assert sorted(before) == [peft_format.ADAPTER_CONFIG, peft_format.ADAPTER_WEIGHTS]

    def fail(tensors, path, **_):
        with open(path, "wb") as file:
            file.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    longer = PromptTuning(num_virtual_tokens=5, also_train=HEAD)
    with pytest.raises(OSError, match="disk full"):
        prompts.export_prompt_peft(longer, longer.init(jax.random.key(1), params), model,
                                   str(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    assert {name: open(tmp_path / "adapter" / name, "rb").read()
            for name in os.listdir(tmp_path / "adapter")} == before


# ---------------------------------------------------------------------------------------------
# PEFT interop, against peft in PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, bert):
    import torch

    torch.set_num_threads(2)
    base = str(tmp_path_factory.mktemp("peft_prompts") / "bert")
    hf.save_pretrained(*bert, base)
    return base


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, llama):
    base = str(tmp_path_factory.mktemp("peft_prefix") / "llama")
    hf.save_pretrained(*llama, base)
    return base


def _tensors(*arrays):
    import torch

    return [None if a is None else torch.tensor(np.asarray(a), dtype=torch.long) for a in arrays]


def _peft_logits(torch_model, ids, mask, types=None):
    """PEFT's forward. For SEQ_CLS prefix tuning, PEFT 0.21.2 checks the base's forward for a
    ``past_key_values`` argument, which transformers 5 renamed ``cache``, and refuses; so that
    one runs the three steps of PEFT's ``_prefix_tuning_forward`` itself: its ``get_prompt``
    cache, the mask with n leading ones, the base model."""
    import torch

    ids, mask, types = _tensors(ids, mask, types)
    config = torch_model.active_peft_config
    with torch.no_grad():
        if config.peft_type == "PREFIX_TUNING" and config.task_type == "SEQ_CLS":
            grown = torch.cat([torch.ones(ids.shape[0], config.num_virtual_tokens,
                                          dtype=torch.long), mask], 1)
            return torch_model.base_model(input_ids=ids, attention_mask=grown,
                                          token_type_ids=types,
                                          cache=torch_model.get_prompt(ids.shape[0])
                                          ).logits.numpy()
        extra = {} if types is None else {"token_type_ids": types}
        return torch_model(input_ids=ids, attention_mask=mask, **extra).logits.numpy()


def _perturbed_head(params, shift=0.3):
    return tree.map_with_path(lambda p, x: x + shift if p.startswith("classifier/") else x,
                              params)


def _round_trip(method, adapted, model, params, directory, base_dir, transformers_class,
                *inputs):
    """Our export, loaded by PEFT, computes what we compute; it imports back to the same."""
    import peft

    config = prompts.export_prompt_peft(method, adapted, model, directory,
                                        base_model_name_or_path=base_dir)
    assert json.load(open(os.path.join(directory, peft_format.ADAPTER_CONFIG))) == config
    base = transformers_class.from_pretrained(base_dir)
    torch_model = peft.PeftModel.from_pretrained(base, directory).eval()
    ours = run(model, method, adapted, *inputs)
    assert gap(ours, _peft_logits(torch_model, *inputs)) < 1e-4
    _, again = prompts.import_prompt_peft(directory, model, params)
    assert gap(run(model, _imported(method), again, *inputs), ours) < 1e-5
    return config


def _imported(method):
    """The method an import of ``method``'s export gives."""
    if isinstance(method, PTuning):
        return method.as_prompt_tuning()
    return method


def _peft_made(config, model, params, base_dir, transformers_class, directory, *inputs):
    """An adapter made and saved by PEFT with random weights (and a changed head) imports as
    the same function."""
    import peft
    import torch

    torch.manual_seed(0)
    base = transformers_class.from_pretrained(base_dir)
    torch_model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, weight in torch_model.named_parameters():
            if "modules_to_save" in name:
                weight.add_(torch.randn_like(weight) * 0.3)
    theirs = _peft_logits(torch_model, *inputs)
    torch_model.save_pretrained(directory)
    method, adapted = prompts.import_prompt_peft(directory, model, params)
    assert gap(run(model, method, adapted, *inputs), theirs) < 1e-4
    return method, adapted


def test_prompt_tuning_matches_peft_both_ways(bert, bert_dir, tmp_path):
    import peft
    import transformers

    model, params = bert
    inputs = token_batch(seed=1)
    method = PromptTuning(num_virtual_tokens=4, prompt_init="random", also_train=HEAD)
    adapted = _perturbed_head(method.init(jax.random.key(5), params))
    config = _round_trip(method, adapted, model, params, str(tmp_path / "ours"), bert_dir,
                         transformers.BertForSequenceClassification, *inputs)
    assert (config["peft_type"], config["task_type"]) == ("PROMPT_TUNING", "SEQ_CLS")
    assert config["modules_to_save"] == ["classifier"]

    method, adapted = _peft_made(
        peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4), model, params,
        bert_dir, transformers.BertForSequenceClassification, str(tmp_path / "theirs"), *inputs)
    assert type(method) is PromptTuning and method.num_virtual_tokens == 4
    assert method.also_train == ("classifier/bias", "classifier/kernel")


def test_p_tuning_matches_peft_both_ways(bert, bert_dir, tmp_path):
    import peft
    import transformers

    model, params = bert
    inputs = token_batch(seed=2)
    method = PTuning(num_virtual_tokens=4, encoder_hidden_size=16, also_train=HEAD)
    adapted = _perturbed_head(method.init(jax.random.key(6), params))
    config = _round_trip(method, adapted, model, params, str(tmp_path / "ours"), bert_dir,
                         transformers.BertForSequenceClassification, *inputs)
    assert config["peft_type"] == "P_TUNING" and config["encoder_hidden_size"] == 16

    # PEFT runs its MLP encoder here (not inference mode); the saved table is its output.
    method, _ = _peft_made(
        peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4,
                                 encoder_hidden_size=16), model, params, bert_dir,
        transformers.BertForSequenceClassification, str(tmp_path / "theirs"), *inputs)
    assert type(method) is PromptTuning


def test_bert_prefix_tuning_matches_peft_both_ways(bert, bert_dir, tmp_path):
    import peft
    import transformers

    model, params = bert
    inputs = token_batch(seed=3)
    method = PrefixTuning(num_virtual_tokens=N, also_train=HEAD)
    adapted = _perturbed_head(method.init(jax.random.key(7), params))
    config = _round_trip(method, adapted, model, params, str(tmp_path / "ours"), bert_dir,
                         transformers.BertForSequenceClassification, *inputs)
    assert (config["num_layers"], config["num_attention_heads"], config["token_dim"]) == (2, 4,
                                                                                           32)
    # PEFT's table layout: layer 1's value is the fourth block of kv_heads·head_dim columns.
    table = safetensors.numpy.load_file(str(tmp_path / "ours" / peft_format.ADAPTER_WEIGHTS))[
        prompts.PROMPT_KEY]
    assert table.shape == (N, 2 * 2 * 32)
    np.testing.assert_array_equal(
        table[:, 96:].reshape(N, 4, 8),
        np.asarray(tree.flatten(adapted)["encoder/layer_1/attn/value/prefix"]))

    imported, _ = _peft_made(
        peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N), model, params,
        bert_dir, transformers.BertForSequenceClassification, str(tmp_path / "theirs"), *inputs)
    assert type(imported) is PrefixTuning and imported.encoder == "encoder"


def test_llama_prefix_tuning_matches_peft_both_ways(llama, llama_dir, tmp_path):
    import peft
    import transformers

    model, params = llama
    ids, mask, _ = token_batch(seed=4)
    method = PrefixTuning(num_virtual_tokens=N, encoder="decoder")
    adapted = method.init(jax.random.key(8), params)
    config = _round_trip(method, adapted, model, params, str(tmp_path / "ours"), llama_dir,
                         transformers.LlamaForCausalLM, ids, mask)
    assert (config["task_type"], config["num_attention_heads"], config["token_dim"]) == (
        "CAUSAL_LM", 2, 16)  # per key/value head (GQA)

    imported, adapted = _peft_made(
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N), model, params,
        llama_dir, transformers.LlamaForCausalLM, str(tmp_path / "theirs"), ids, mask)
    assert imported.encoder == "decoder" and imported.also_train == ()
    assert prefix_lib.to_peft_table(imported, tree.flatten(adapted)).shape == (N, 2 * 2 * 16)
