"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"): the model stays frozen and ``n`` trained vectors are prepended to the input
embeddings. P-tuning (Liu et al., 2021, "GPT Understands, Too"): the same virtual tokens, but
produced by a small prompt encoder (an MLP or a bidirectional LSTM over ``n`` free embeddings),
PEFT's ``PROMPT_ENCODER`` / ``P_TUNING``.

Semantics are PEFT's (``PeftModelForSequenceClassification.forward``), so a PEFT adapter runs
the same function here: the virtual tokens go *before* the input (before [CLS]), token type 0,
and the attention mask gains ``n`` leading ones. transformers' BERT then adds positions
``0..n+L-1`` to the whole sequence, prompt included, and its pooler reads position 0, the first
virtual token, not [CLS]. The encoder's output keeps the ``n`` prompt rows (PEFT's
``last_hidden_state`` has them too), so a token-level head sees them first.

Interception (no model edit) at three sites, as in :mod:`research.lowrank.dept`: the embeddings
module gets ``n`` placeholder ids in front; the word table's rows for them become the prompt;
the encoder's padding mask gains ``n`` leading ones. Positions need nothing: the embeddings
module already numbers the ``n + L`` rows it sees.

The PEFT format (both ways) for these two and :mod:`research.adapters.prefix` is
:func:`export_prompt_peft` / :func:`import_prompt_peft`, over :mod:`research.peft_format`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from research import peft_format, sites, tree
from research.adapters import prefix as prefix_lib
from research.methods import Applied, Method, register
from research.models import hf

PROMPT = "prompt"
ENCODER = "prompt_encoder"
INITS = ("sample_vocab", "random")
ENCODERS = ("MLP",)


def _prepend(x, rows):
    """``x [B, L, ...]`` with ``rows [B, n, ...]`` in front."""
    return jnp.concatenate([rows.astype(x.dtype), x], axis=1)


@register("prompt_tuning")
@dataclasses.dataclass(frozen=True)
class PromptTuning(Method):
    """Prompt tuning options (``config.method = dict(name='prompt_tuning', ...)``).

    num_virtual_tokens: ``n``, trained vectors before the input (PEFT's name).
    prompt_init: ``sample_vocab`` (rows of ``n`` vocabulary ids drawn uniformly, Lester et al.'s
        better init) or ``random`` (N(0, 1), PEFT's RANDOM).
    embedding: path of the word table; the prompt sits beside its module's parent
        (``embeddings/prompt`` for BERT). encoder: the module taking ``(x, attention_mask, ...)``.
    also_train: extra path regexes that train (the classifier, PEFT's ``modules_to_save``).
    Trainable: ``n·embed`` plus ``also_train``.
    """

    num_virtual_tokens: int = 20
    prompt_init: str = "sample_vocab"  # not "init": that is the Method's own
    embedding: str = "embeddings/word/embedding"
    encoder: str = "encoder"
    also_train: tuple = ()
    name: str = dataclasses.field(default="prompt_tuning", init=False, repr=False)

    def __post_init__(self):
        prefix_lib.check_length(self.name, self.num_virtual_tokens)
        if self.prompt_init not in INITS:
            raise ValueError(f"{self.name} prompt_init={self.prompt_init!r} is not one of "
                             f"{INITS}")
        object.__setattr__(self, "also_train", tuple(self.also_train or ()))
        if self.trainable is None:
            object.__setattr__(self, "trainable", (*self.own_leaves(), *self.also_train))

    @property
    def prompt_path(self) -> str:
        return sites.join(sites.parent(sites.parent(self.embedding)), PROMPT)

    def own_leaves(self) -> tuple[str, ...]:
        """Regexes of the method's own leaves."""
        return (re.escape(self.prompt_path),)

    def _table(self, flat):
        if self.embedding not in flat:
            raise ValueError(f"{self.name} embedding={self.embedding!r} is not a parameter; "
                             f"closest: {', '.join(tree.closest_paths(self.embedding, flat))}")
        return flat[self.embedding]

    def _initial_prompt(self, rng, table):
        shape = (self.num_virtual_tokens, table.shape[1])
        if self.prompt_init == "random":
            return jax.random.normal(rng, shape, table.dtype)
        rows = jax.random.randint(rng, shape[:1], 0, table.shape[0])
        return jnp.take(table, rows, axis=0)

    def init(self, rng, params: dict, stats=None) -> dict:
        del stats
        flat = dict(tree.flatten(params))
        flat[self.prompt_path] = self._initial_prompt(rng, self._table(flat))
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        del shapes
        flat = dict(tree.flatten(logical))
        flat[self.prompt_path] = (None, "embed")
        return tree.unflatten(flat)

    def prompt(self, flat: dict):
        """The ``[n, embed]`` virtual tokens the encoder sees."""
        if self.prompt_path not in flat:
            raise ValueError(f"{self.name} prompt {self.prompt_path!r} is not in the params "
                             f"(run init first)")
        return flat[self.prompt_path]

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        flat = tree.flatten(variables["params"])
        prompt = self.prompt(flat)
        if prompt.shape[0] != self.num_virtual_tokens:
            raise ValueError(f"{self.name}: the params' prompt has {prompt.shape[0]} rows, "
                             f"not num_virtual_tokens={self.num_virtual_tokens}")
        if not any(path.startswith(self.encoder + tree.SEP) for path in flat):
            modules = sorted({sites.parent(path) for path in flat})
            raise ValueError(f"{self.name} encoder={self.encoder!r} is not a module; closest: "
                             f"{', '.join(tree.closest_paths(self.encoder, modules))}")
        word = sites.parent(self.embedding)
        handler = functools.partial(_with_prompt, prompt=prompt, word=word,
                                    embeddings=sites.parent(word))
        with sites.intercept(handler, sites.at({sites.parent(word), word, self.encoder})):
            return Applied(module.apply(variables, *args, **kwargs))

    def export(self, params: dict) -> dict:
        """The params as they are: a prompt cannot fold into the weights, so it stays beside
        them at :attr:`prompt_path`."""
        return params


def _with_prompt(call: sites.Call, prompt, word: str, embeddings: str):
    n = prompt.shape[0]
    if call.path == embeddings:  # (input_ids, token_type_ids, deterministic)
        ids, types, *rest = call.args
        room = jnp.zeros((ids.shape[0], n), ids.dtype)
        return call.run(_prepend(ids, room), _prepend(types, room.astype(types.dtype)), *rest,
                        **call.kwargs)
    if call.path == word:
        y = call.output()
        return _prepend(y[:, n:], jnp.broadcast_to(prompt, (y.shape[0], *prompt.shape)))
    x, mask, *rest = call.args  # the encoder: (x, attention_mask, deterministic, ...)
    if mask is not None:  # PEFT extends a given mask only
        mask = _prepend(mask, jnp.ones((mask.shape[0], n), mask.dtype))
    return call.run(x, mask, *rest, **call.kwargs)


@register("p_tuning")
@dataclasses.dataclass(frozen=True)
class PTuning(PromptTuning):
    """P-tuning options (``config.method = dict(name='p_tuning', ...)``): PromptTuning's, plus

    encoder_hidden_size: width of PEFT's MLP encoder ``Linear(E,h)-ReLU-Linear(h,h)-ReLU-
        Linear(h,E)`` over ``n`` free embeddings (N(0, 1)); the Linears start as torch's
        (U(±1/sqrt(fan_in))). Its leaves sit under ``embeddings/prompt_encoder``.
    encoder_reparameterization_type: ``MLP`` (PEFT's default and recommendation; LSTM is not
        supported).

    ``export`` runs the encoder once and returns the plain prompt table at
    :attr:`prompt_path` (the encoder leaves dropped): the encoder only reparameterises the
    prompt during training, so a :class:`PromptTuning` with the same ``num_virtual_tokens``
    reproduces the model from the export, and ``init_from`` reuses it as a prompt. PEFT saves a
    P-tuning adapter the same way (``prompt_embeddings`` is the encoder's output).
    """

    encoder_hidden_size: int = 128
    encoder_reparameterization_type: str = "MLP"
    name: str = dataclasses.field(default="p_tuning", init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.encoder_reparameterization_type not in ENCODERS:
            raise ValueError(f"p_tuning encoder_reparameterization_type="
                             f"{self.encoder_reparameterization_type!r} is not one of {ENCODERS}")
        if not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size < 1:
            raise ValueError(f"p_tuning encoder_hidden_size={self.encoder_hidden_size!r} is not "
                             f"a positive integer")

    @property
    def encoder_path(self) -> str:
        return sites.join(sites.parent(sites.parent(self.embedding)), ENCODER)

    def own_leaves(self) -> tuple[str, ...]:
        return (re.escape(self.encoder_path) + "/.*",)

    def init(self, rng, params: dict, stats=None) -> dict:
        del stats
        flat = dict(tree.flatten(params))
        width, hidden = self._table(flat).shape[1], self.encoder_hidden_size
        keys = jax.random.split(rng, 7)
        flat[f"{self.encoder_path}/embedding"] = jax.random.normal(
            keys[0], (self.num_virtual_tokens, width), jnp.float32)
        for i, (n_in, n_out) in enumerate(((width, hidden), (hidden, hidden), (hidden, width))):
            bound = 1.0 / math.sqrt(n_in)
            flat[f"{self.encoder_path}/mlp_{i}/kernel"] = jax.random.uniform(
                keys[1 + 2 * i], (n_in, n_out), jnp.float32, -bound, bound)
            flat[f"{self.encoder_path}/mlp_{i}/bias"] = jax.random.uniform(
                keys[2 + 2 * i], (n_out,), jnp.float32, -bound, bound)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        flat = dict(tree.flatten(logical))
        for path, shape in tree.flatten(shapes).items():
            if path.startswith(self.encoder_path + tree.SEP):
                flat[path] = (None,) * len(shape.shape)
        return tree.unflatten(flat)

    def prompt(self, flat: dict):
        base = f"{self.encoder_path}/embedding"
        if base not in flat:
            raise ValueError(f"p_tuning encoder {self.encoder_path!r} is not in the params "
                             f"(run init first)")
        x = flat[base]
        for i in range(3):
            x = x @ flat[f"{self.encoder_path}/mlp_{i}/kernel"] + flat[
                f"{self.encoder_path}/mlp_{i}/bias"]
            x = jax.nn.relu(x) if i < 2 else x
        return x

    def export(self, params: dict) -> dict:
        """The model params plus the encoder's output as a plain prompt table (see above)."""
        flat = tree.flatten(params)
        prompt = self.prompt(flat)
        kept = {p: v for p, v in flat.items() if not p.startswith(self.encoder_path + tree.SEP)}
        kept[self.prompt_path] = prompt
        return tree.unflatten(kept)

    def as_prompt_tuning(self) -> PromptTuning:
        """The prompt-tuning method that runs :meth:`export`'s params."""
        return PromptTuning(num_virtual_tokens=self.num_virtual_tokens, embedding=self.embedding,
                            encoder=self.encoder, also_train=self.also_train)


# ---------------------------------------------------------------------------------------------
# PEFT format
# ---------------------------------------------------------------------------------------------

PROMPT_KEY = "prompt_embeddings"
KEY_PREFIX = "base_model."  # prompt learning wraps the transformers model directly
PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
TASK_TYPES = {"classifier": "SEQ_CLS", "encoder": "FEATURE_EXTRACTION", "lm": "CAUSAL_LM"}


def _names(model) -> dict[str, tuple[str, hf.Layout]]:
    """Our path -> (HF tensor name, layout) for ``model``'s own params."""
    return peft_format.hf_names(model, tree.flatten(model.param_shapes()))


def export_prompt_peft(method: Method, params, model, directory: str, *,
                       base_model_name_or_path: str | None = None) -> dict:
    """Write a :class:`PromptTuning`, :class:`PTuning` or
    :class:`~research.adapters.prefix.PrefixTuning` adapter in PEFT's format for ``model``'s
    ``transformers`` class: ``prompt_embeddings`` (the prompt; P-tuning's encoder output; the
    prefix as PEFT's ``[n, layers·2·kv_heads·head_dim]`` table) and the ``also_train`` modules
    as ``modules_to_save``. Returns the adapter config written."""
    flat, c = tree.flatten(params), model.config
    kinds = {PTuning: "P_TUNING", PromptTuning: "PROMPT_TUNING",
             prefix_lib.PrefixTuning: "PREFIX_TUNING"}
    peft_type = next((kind for cls, kind in kinds.items() if type(method) is cls), None)
    if peft_type is None:
        raise ValueError(f"export_prompt_peft: {type(method).__name__} is not one of "
                         f"{[cls.__name__ for cls in kinds]}")
    config = {"peft_type": peft_type, "task_type": TASK_TYPES.get(model.head),
              "base_model_name_or_path": base_model_name_or_path, "revision": None,
              "inference_mode": True, "num_virtual_tokens": method.num_virtual_tokens,
              "token_dim": c.hidden_size, "num_transformer_submodules": 1,
              "num_attention_heads": c.num_heads, "num_layers": c.num_layers}
    if peft_type == "PREFIX_TUNING":
        # The prefix rows are key/value heads: PEFT sizes them so for GQA too.
        width = c.num_kv_heads * c.head_dim
        config.update(num_attention_heads=c.num_kv_heads, token_dim=width,
                      encoder_hidden_size=width, prefix_projection=False, init_weights=None)
        table = prefix_lib.to_peft_table(method, flat)
    else:
        table = method.prompt(flat)
        if peft_type == "P_TUNING":
            config.update(encoder_hidden_size=method.encoder_hidden_size, encoder_num_layers=2,
                          encoder_reparameterization_type=method.encoder_reparameterization_type,
                          encoder_dropout=0.0)
        else:
            config.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                          tokenizer_name_or_path=None, tokenizer_kwargs=None)
    saved, tensors = peft_format.modules_to_save(method.also_train, flat, _names(model),
                                                 key_prefix=KEY_PREFIX)
    tensors[PROMPT_KEY] = np.asarray(table, np.float32)
    config["modules_to_save"] = saved or None
    peft_format.write_adapter(directory, config, tensors)
    return config


def _check_prefix_config(config: dict, config_path: str, c) -> None:
    """The prefix adapter's sizes against the model's (PEFT views its table by them)."""
    expected = {"num_layers": c.num_layers, "num_attention_heads": c.num_kv_heads,
                "token_dim": c.num_kv_heads * c.head_dim}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(f"{config_path}: {key}={config[key]!r} does not fit this model, "
                             f"which needs {value}")


def import_prompt_peft(directory: str, model, params) -> tuple[Method, dict]:
    """``(method, params with its leaves)`` from a PEFT prompt-learning adapter for ``model``.
    ``PROMPT_TUNING`` and ``P_TUNING`` give a :class:`PromptTuning`: a saved P-tuning adapter
    holds only its encoder's output, which is also all PEFT runs when it loads one.
    ``PREFIX_TUNING`` (``prefix_projection=False``) gives a
    :class:`~research.adapters.prefix.PrefixTuning`. ``modules_to_save`` weights replace
    theirs and train (``also_train``)."""
    adapter = peft_format.read_adapter(directory)
    config, config_path, weights_path = adapter.config, adapter.config_path, adapter.weights_path
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"{config_path}: peft_type={peft_type!r} is not one of {PEFT_TYPES}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{config_path}: num_transformer_submodules="
                         f"{config['num_transformer_submodules']!r}; only 1 (no encoder-decoder)")
    if peft_type == "PREFIX_TUNING" and config.get("prefix_projection", False):
        raise ValueError(f"{config_path}: prefix_projection=True is not supported (only False)")
    tensors = dict(adapter.tensors)
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{weights_path} holds no {PROMPT_KEY!r} tensor")
    table = tensors.pop(PROMPT_KEY)
    n = config.get("num_virtual_tokens")
    prefix_lib.check_length(f"{config_path}:", n)
    if peft_type == "PREFIX_TUNING":
        _check_prefix_config(config, config_path, model.config)
    flat = dict(tree.flatten(params))
    names = _names(model)
    by_name = {name: path for path, (name, _) in names.items()}
    saved = {}
    for key, value in tensors.items():
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
        if name not in by_name:
            near = ", ".join(tree.closest_paths(str(name or key), by_name))
            raise ValueError(f"{weights_path}: tensor {key!r} has no counterpart in this "
                             f"{model.family} model; closest: {near}")
        saved[by_name[name]] = (key, value)
    flat.update({path: jnp.asarray(value) for path, value in
                 peft_format.load_saved(saved, names, flat, weights_path).items()})
    also_train = peft_format.exact_rules(saved)
    stack = hf.FORMATS[model.family].stack
    if peft_type == "PREFIX_TUNING":
        method = prefix_lib.PrefixTuning(num_virtual_tokens=n, encoder=stack,
                                         also_train=also_train)
        flat.update(prefix_lib.from_peft_table(method, flat, table, weights_path))
        return method, tree.unflatten(flat)
    method = PromptTuning(num_virtual_tokens=n, encoder=stack, also_train=also_train)
    width = tuple(flat[method.embedding].shape)[1]
    if tuple(table.shape) != (n, width):
        raise ValueError(f"{weights_path}: {PROMPT_KEY} {tuple(table.shape)} does not fit "
                         f"num_virtual_tokens={n} and this model's embed width {width}")
    flat[method.prompt_path] = jnp.asarray(table, jnp.float32)
    return method, tree.unflatten(flat)
