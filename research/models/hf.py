"""Hugging Face checkpoints <-> zoo params (the ``transformers`` on-disk layout).

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``). Only JSON and safetensors are read, so loading never runs
code. Each zoo param maps to one HF tensor by name plus a layout change: torch ``Linear`` stores
``[out, in]`` where we store ``[in, out]`` (attention kernels keep heads as their own axis),
and torch convolutions are ``[out, C, h, w]`` where Flax's are ``[h, w, C, out]``. The changes
are transposes and reshapes only, so load -> save -> load is bit-exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from research import models, tree

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# Layouts: how one tensor is stored by torch versus here
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    to_ours: Callable  # (hf array, our shape) -> our array
    to_hf: Callable    # our array -> hf array; only method calls, so it also runs on shapes


COPY = Layout(lambda w, shape: w, lambda k: k)
# Per-head biases [heads, head_dim] are flat vectors in torch.
FLAT = Layout(lambda w, shape: w.reshape(shape), lambda k: k.reshape(-1))
# ViT's [CLS] and position table carry leading batch axes of size 1 in torch.
BATCHED = Layout(lambda w, shape: w.reshape(shape),
                 lambda k: k.reshape((1,) * (3 - k.ndim) + k.shape))
CONV = Layout(lambda w, shape: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


def linear(input_axes: int) -> Layout:
    """torch ``[out, in]`` <-> our kernel whose first ``input_axes`` axes are the input."""
    return Layout(lambda w, shape: w.T.reshape(shape),
                  lambda k: k.reshape(math.prod(k.shape[:input_axes]), -1).T)


def _dense(ours: str, theirs: str, layout: Layout = linear(1)) -> dict:
    return {f"{ours}/kernel": (f"{theirs}.weight", layout),
            f"{ours}/bias": (f"{theirs}.bias", COPY)}


def _norm(ours: str, theirs: str) -> dict:
    return {f"{ours}/scale": (f"{theirs}.weight", COPY), f"{ours}/bias": (f"{theirs}.bias", COPY)}


def _attention(query: str, key: str, value: str, out: str) -> dict:
    names = {}
    for ours, theirs in (("query", query), ("key", key), ("value", value)):
        names[f"attn/{ours}/kernel"] = (f"{theirs}.weight", linear(1))
        names[f"attn/{ours}/bias"] = (f"{theirs}.bias", FLAT)
    return {**names, **_dense("attn/out", out, linear(2))}


# ---------------------------------------------------------------------------------------------
# Families: tensor names and config.json fields
# ---------------------------------------------------------------------------------------------


def _num_classes(hf: dict) -> dict:
    labels = hf.get("id2label")
    return {"num_classes": len(labels) if labels else hf.get("num_labels", 2)}


def _labels(config) -> dict:
    return {"id2label": {str(i): f"LABEL_{i}" for i in range(config.num_classes)},
            "label2id": {f"LABEL_{i}": i for i in range(config.num_classes)}}


def _require(hf: dict, key: str, supported, default) -> None:
    value = hf.get(key, default)
    if value not in supported:
        raise ValueError(f"{CONFIG_FILE}: {key}={value!r} is not supported (only {supported})")


def _read_bert(hf: dict) -> dict:
    _require(hf, "hidden_act", ("gelu",), "gelu")
    _require(hf, "position_embedding_type", ("absolute",), "absolute")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], max_length=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02), **_num_classes(hf))


def _write_bert(config) -> dict:
    return dict(
        model_type="bert", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim, hidden_act="gelu",
        max_position_embeddings=config.max_length, type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.norm_eps, hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        initializer_range=config.initializer_range, position_embedding_type="absolute",
        pad_token_id=0, tie_word_embeddings=True, **_labels(config))


def _read_vit(hf: dict) -> dict:
    _require(hf, "hidden_act", ("gelu",), "gelu")
    _require(hf, "qkv_bias", (True,), True)
    return dict(
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
        image_size=hf["image_size"], patch_size=hf["patch_size"],
        num_channels=hf.get("num_channels", 3), norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
        initializer_range=hf.get("initializer_range", 0.02), **_num_classes(hf))


def _write_vit(config) -> dict:
    return dict(
        model_type="vit", hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.mlp_dim,
        hidden_act="gelu", image_size=config.image_size, patch_size=config.patch_size,
        num_channels=config.num_channels, layer_norm_eps=config.norm_eps,
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        initializer_range=config.initializer_range, qkv_bias=True, **_labels(config))


def _read_llama(hf: dict) -> dict:
    _require(hf, "hidden_act", ("silu",), "silu")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{CONFIG_FILE}: rope_type={rope_type!r} is not supported (only "
                         f"'default')")
    bias = hf.get("attention_bias", False)
    if hf.get("mlp_bias", False) != bias:
        raise ValueError(f"{CONFIG_FILE}: attention_bias={bias} with mlp_bias="
                         f"{hf.get('mlp_bias')} is not supported (they must agree)")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], max_length=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), use_bias=bias,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_dropout=hf.get("attention_dropout", 0.0),
        initializer_range=hf.get("initializer_range", 0.02))


def _write_llama(config) -> dict:
    return dict(
        model_type="llama", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        intermediate_size=config.mlp_dim, hidden_act="silu",
        max_position_embeddings=config.max_length, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, attention_bias=config.use_bias, mlp_bias=config.use_bias,
        attention_dropout=config.attention_dropout, tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range)


@dataclasses.dataclass(frozen=True)
class Format:
    """One family's HF layout. Trunk tensors sit under ``prefix`` in task checkpoints
    (``bert.``, ``vit.``, ``model.``) and at the top level in bare-trunk ones."""
    prefix: str
    stack: str            # our stack module: 'encoder' or 'decoder'
    hf_layers: str        # HF's name for layer i is f"{hf_layers}{i}."
    layer: dict           # our path inside layer_{i} -> (HF name inside layer i, layout)
    trunk: dict           # our path -> (HF name below prefix, layout)
    heads: dict           # our path -> (HF name at top level, layout)
    fresh_ok: tuple       # our path prefixes that may be initialised when the checkpoint lacks them
    architectures: dict   # HF class name -> (our head, trunk under prefix?)
    read_config: Callable
    write_config: Callable
    grouped_heads: bool = False  # HF's config can say num_kv_heads and head_dim
    flexible: tuple = ()         # options HF's config can set away from the family default

    def hf_name(self, path: str, prefix: str) -> tuple[str, Layout]:
        stack_prefix = f"{self.stack}/layer_"
        if path.startswith(stack_prefix):
            index, inner = path[len(stack_prefix):].split("/", 1)
            name, layout = self.layer[inner]
            return f"{prefix}{self.hf_layers}{index}.{name}", layout
        if path in self.trunk:
            name, layout = self.trunk[path]
            return prefix + name, layout
        return self.heads[path]

    def architecture(self, head: str) -> tuple[str, bool]:
        return next((name, prefixed) for name, (ours, prefixed) in self.architectures.items()
                    if ours == head)


FORMATS = {
    "bert": Format(
        prefix="bert.", stack="encoder", hf_layers="encoder.layer.",
        layer={**_attention("attention.self.query", "attention.self.key", "attention.self.value",
                            "attention.output.dense"),
               **_norm("attn_norm", "attention.output.LayerNorm"),
               **_dense("mlp/wi", "intermediate.dense"), **_dense("mlp/wo", "output.dense"),
               **_norm("mlp_norm", "output.LayerNorm")},
        trunk={"embeddings/word/embedding": ("embeddings.word_embeddings.weight", COPY),
               "embeddings/position/embedding": ("embeddings.position_embeddings.weight", COPY),
               "embeddings/token_type/embedding":
                   ("embeddings.token_type_embeddings.weight", COPY),
               **_norm("embeddings/norm", "embeddings.LayerNorm"),
               **_dense("pooler", "pooler.dense")},
        heads={**_dense("classifier", "classifier"),
               **_dense("mlm/transform", "cls.predictions.transform.dense"),
               **_norm("mlm/transform_norm", "cls.predictions.transform.LayerNorm"),
               "mlm/bias": ("cls.predictions.bias", COPY)},
        fresh_ok=("pooler/", "classifier/", "mlm/"),
        architectures={"BertModel": ("encoder", False),
                       "BertForSequenceClassification": ("classifier", True),
                       "BertForMaskedLM": ("mlm", True)},
        read_config=_read_bert, write_config=_write_bert),
    "vit": Format(
        prefix="vit.", stack="encoder", hf_layers="encoder.layer.",
        layer={**_attention("attention.attention.query", "attention.attention.key",
                            "attention.attention.value", "attention.output.dense"),
               **_norm("attn_norm", "layernorm_before"),
               **_dense("mlp/wi", "intermediate.dense"), **_dense("mlp/wo", "output.dense"),
               **_norm("mlp_norm", "layernorm_after")},
        trunk={"embeddings/cls": ("embeddings.cls_token", BATCHED),
               "embeddings/position": ("embeddings.position_embeddings", BATCHED),
               **_dense("embeddings/patch", "embeddings.patch_embeddings.projection", CONV),
               **_norm("encoder/final_norm", "layernorm")},
        heads=_dense("classifier", "classifier"),
        fresh_ok=("classifier/",),
        architectures={"ViTForImageClassification": ("classifier", True),
                       "ViTModel": ("classifier", False)},
        read_config=_read_vit, write_config=_write_vit),
    "llama": Format(
        prefix="model.", stack="decoder", hf_layers="layers.",
        layer={**_attention("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                            "self_attn.o_proj"),
               "attn_norm/scale": ("input_layernorm.weight", COPY),
               "mlp_norm/scale": ("post_attention_layernorm.weight", COPY),
               **_dense("mlp/gate", "mlp.gate_proj"), **_dense("mlp/up", "mlp.up_proj"),
               **_dense("mlp/down", "mlp.down_proj")},
        trunk={"embeddings/word/embedding": ("embed_tokens.weight", COPY),
               "decoder/final_norm/scale": ("norm.weight", COPY)},
        heads={"lm_head/kernel": ("lm_head.weight", linear(1))},
        fresh_ok=("lm_head/",),
        architectures={"LlamaForCausalLM": ("lm", True)},
        read_config=_read_llama, write_config=_write_llama, grouped_heads=True,
        flexible=("use_bias",)),
}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_config(directory: str) -> tuple[str, dict]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as file:
        hf_config = json.load(file)
    family = hf_config.get("model_type")
    if family not in FORMATS:
        raise ValueError(f"{path}: model_type={family!r} is not supported; "
                         f"valid: {', '.join(FORMATS)}")
    return family, hf_config


def _canonical(name: str) -> str:
    # Early BERT checkpoints name LayerNorm parameters gamma/beta.
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                  re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def _tensor_files(directory: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """``(the file to name in errors, {canonical name: (file, stored name)})``."""
    single, index = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, INDEX_FILE)
    if os.path.isfile(single):
        with safetensors.safe_open(single, "flax") as file:
            return single, {_canonical(name): (single, name) for name in file.keys()}
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{directory}: neither {WEIGHTS_FILE} nor {INDEX_FILE} exists")
    with open(index) as file:
        weight_map = json.load(file)["weight_map"]
    files = {}
    for name, shard in weight_map.items():
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"{index}: shard {shard_path} (holding {name!r}) is missing")
        files[_canonical(name)] = (shard_path, name)
    return index, files


def _fresh_params(model, paths: list[str], rng) -> dict:
    """Initialise only ``paths``; under jit, XLA drops the work for every other param."""
    def init_selected(key):
        flat = tree.flatten(model.init(key))
        return {path: flat[path] for path in paths}
    return jax.jit(init_selected)(rng)


def load_pretrained(path: str, head: str | None = None, *, model=None, rng=None, **overrides):
    """``(Model, params)`` from an HF checkpoint directory.

    Without ``model``, the model comes from ``config.json``: ``head`` defaults to the
    checkpoint's architecture and ``overrides`` replace ModelConfig fields (e.g. ``dtype``,
    ``num_classes``). With ``model`` (a zoo Model), the checkpoint is loaded into it. Params
    the checkpoint lacks but a head needs (a classifier on an encoder checkpoint) are
    initialised from ``rng`` (default ``jax.random.key(0)``) and listed in
    ``model.newly_initialized``; any other missing or misshapen tensor is an error.
    """
    family, hf_config = _read_config(path)
    fmt = FORMATS[family]
    if model is None:
        if head is None:
            # An architecture we have no head for (say BertForTokenClassification) still
            # gives its trunk: take the family's first head.
            architecture = (hf_config.get("architectures") or [None])[0]
            known = fmt.architectures.get(architecture)
            head = (known or next(iter(fmt.architectures.values())))[0]
        settings = {**models.FAMILIES[family].ARCHITECTURE, **fmt.read_config(hf_config)}
        model = models.make(family, head, models.make_config(**{**settings, **overrides}))
    elif head is not None or overrides:
        raise ValueError("load_pretrained: pass either model= or head/overrides, not both")
    elif model.family != family:
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)}: a {family} checkpoint cannot "
                         f"load into a {model.family} model")

    error_file, tensors = _tensor_files(path)
    prefix = fmt.prefix if any(name.startswith(fmt.prefix) for name in tensors) else ""
    shapes = tree.flatten(model.param_shapes())
    params, missing = {}, []
    with contextlib.ExitStack() as stack:
        handles = {}
        for our_path, shape in shapes.items():
            name, layout = fmt.hf_name(our_path, prefix)
            expected = tuple(jax.eval_shape(layout.to_hf, shape).shape)
            if name not in tensors:
                if our_path.startswith(fmt.fresh_ok):
                    missing.append(our_path)
                    continue
                raise ValueError(f"{error_file}: tensor {name!r} (shape {expected}) for "
                                 f"{our_path} {tuple(shape.shape)} is missing")
            file_path, stored_name = tensors[name]
            if file_path not in handles:
                handles[file_path] = stack.enter_context(safetensors.safe_open(file_path, "flax"))
            actual = tuple(handles[file_path].get_slice(stored_name).get_shape())
            if actual != expected:
                raise ValueError(f"{file_path}: tensor {stored_name!r} has shape {actual}, but "
                                 f"{our_path} {tuple(shape.shape)} needs {expected}")
            weight = np.asarray(handles[file_path].get_tensor(stored_name), np.float32)
            params[our_path] = jnp.asarray(layout.to_ours(weight, shape.shape))
    if missing:
        params.update(_fresh_params(model, missing, jax.random.key(0) if rng is None else rng))
    ordered = {path: params[path] for path in shapes}
    return dataclasses.replace(model, newly_initialized=tuple(missing)), tree.unflatten(ordered)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _check_expressible(model) -> None:
    config, fmt = model.config, FORMATS[model.family]
    for key, value in models.FAMILIES[model.family].ARCHITECTURE.items():
        if key not in fmt.flexible and getattr(config, key) != value:
            raise ValueError(f"HF {model.family} has {key}={value!r}; this model has "
                             f"{getattr(config, key)!r}")
    if not fmt.grouped_heads and (config.num_kv_heads != config.num_heads
                                  or config.head_dim * config.num_heads != config.hidden_size):
        raise ValueError(f"HF {model.family} needs num_kv_heads == num_heads and head_dim * "
                         f"num_heads == hidden_size; this model has {config.num_kv_heads}, "
                         f"{config.head_dim} * {config.num_heads} != {config.hidden_size}")
    if config.removed_sublayers:
        # transformers would fill the missing tensors with random weights, silently.
        raise ValueError(f"HF {model.family} cannot express removed_sublayers="
                         f"{list(config.removed_sublayers)}; keep the pruned model as a Scion "
                         "checkpoint")


def save_pretrained(model, params, directory: str) -> None:
    """Write ``config.json`` and ``model.safetensors`` in HF layout, loadable by both
    :func:`load_pretrained` and ``transformers``' ``from_pretrained``.

    Files are written to a temporary directory next to ``directory`` and then renamed into
    place, so a crash never leaves a half-written checkpoint: a new directory appears whole;
    in an existing one (which may hold a tokenizer) each file is replaced atomically.
    """
    _check_expressible(model)
    tree.check_same_structure(model.param_shapes(), params)
    fmt = FORMATS[model.family]
    architecture, prefixed = fmt.architecture(model.head)
    tensors = {}
    for path, value in tree.flatten(params).items():
        name, layout = fmt.hf_name(path, fmt.prefix if prefixed else "")
        tensors[name] = np.ascontiguousarray(layout.to_hf(np.asarray(value, np.float32)))
    hf_config = {"architectures": [architecture], **fmt.write_config(model.config)}

    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    try:
        safetensors.numpy.save_file(tensors, os.path.join(staging, WEIGHTS_FILE),
                                    metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_FILE), "w") as file:
            json.dump(hf_config, file, indent=2, sort_keys=True)
        if os.path.isdir(directory):
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
        else:
            os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
