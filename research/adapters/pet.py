"""Pattern-exploiting training (Schick & Schütze, 2021, "Exploiting Cloze Questions for Few
Shot Text Classification and Natural Language Inference"), as used with adapters for few-shot
content analysis (Rieger et al., 2023, "Few-shot learning for automated content analysis"):
classification as a cloze. A *pattern* turns the input into a question with one masked word
("<text> It was [MASK].") and a *verbaliser* names one vocabulary word per label ("terrible",
"great"); the class scores are the masked-LM logits of those words at the mask, and the loss is
the cross-entropy over them (the loop's classification loss, unchanged).

The run's model is a classifier (``minilm_l6_classifier``): the loop's classification data,
loss and metrics apply as they are. The method rewrites the inputs (the loader's
``[CLS] text [SEP]`` rows become ``[CLS] pattern-with-text [SEP]``, longer by the pattern's
tokens), has the encoder compute every row (not [CLS] alone), and at the ``classifier`` site
returns the verbaliser logits of BERT's masked-LM head at the mask row instead of the
classifier's (whose leaves then go unused). The head is BERT's (:class:`MaskedLMHead`: dense,
GELU, LayerNorm, then the word table transposed plus a vocabulary bias), its leaves the
method's own under ``mlm/`` (BertForMaskedLM's names).

all-MiniLM-L6-v2 ships no masked-LM head (its safetensors hold the trunk and pooler only), so
the head starts fresh (BERT's init) and trains. The decoder stays tied to the frozen word table:
no new class weights, the class vectors are the verbaliser words' pretrained embeddings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from research import sites, tree
from research.methods import Applied, Method, register
from research.models.bert import MaskedLMHead

HEAD = "mlm"
TEXT = "{text}"
MASK = "[MASK]"
INITIALIZER_RANGE = 0.02  # BERT's, for the fresh head's dense kernel
# The head's leaves and their logical axes (BertForMaskedLM's).
AXES = {"transform/kernel": ("embed", None), "transform/bias": (None,),
        "transform_norm/scale": ("embed",), "transform_norm/bias": ("embed",), "bias": ("vocab",)}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # BertModel.input_names


class Cloze(NamedTuple):
    """A tokenised pattern: ids before and after the text, where the mask sits, and the
    verbaliser's token ids in label order."""
    before: tuple[int, ...]
    after: tuple[int, ...]
    mask_in_before: int | None  # index of [MASK] in ``before``, or None (then in ``after``)
    mask_in_after: int | None
    label_ids: tuple[int, ...]


def tokenize(pattern: str, verbalizer: tuple, vocab: str | None) -> Cloze:
    """The pattern and verbaliser as token ids of the WordPiece ``vocab`` (None: MiniLM's,
    which the data loader uses); each problem is a one-line error naming the option."""
    from research.data import tokenize as tokenize_lib  # the data stack loads only when needed

    if not isinstance(pattern, str) or pattern.count(TEXT) != 1:
        raise ValueError(f"config.method.pattern={pattern!r} must hold the input's slot "
                         f"{TEXT} exactly once")
    if pattern.count(MASK) != 1:
        raise ValueError(f"config.method.pattern={pattern!r} must hold one {MASK} slot (it has "
                         f"{pattern.count(MASK)}): the one word the verbaliser fills")
    path = vocab or tokenize_lib.default_vocab_path()
    tokenizer = tokenize_lib.wordpiece(path)
    mask_id = tokenizer.token_to_id(MASK)
    if mask_id is None:
        raise ValueError(f"config.method.vocab={path!r} has no {MASK} token")
    before, after = (tuple(tokenizer.encode(part, add_special_tokens=False).ids)
                     for part in pattern.split(TEXT))
    if isinstance(verbalizer, str) or len(verbalizer) < 2:
        raise ValueError(f"config.method.verbalizer={verbalizer!r} must list one word per "
                         f"label (two or more)")
    label_ids = []
    for word in verbalizer:
        encoding = tokenizer.encode(str(word), add_special_tokens=False)
        if len(encoding.ids) != 1 or encoding.ids[0] == tokenizer.token_to_id("[UNK]"):
            raise ValueError(f"config.method.verbalizer: {word!r} is not one token of "
                             f"{path} (it reads as {encoding.tokens}); each label's word must be")
        label_ids.append(encoding.ids[0])
    if len(set(label_ids)) != len(label_ids):
        raise ValueError(f"config.method.verbalizer={verbalizer!r} names a token twice")
    return Cloze(before, after, before.index(mask_id) if mask_id in before else None,
                 after.index(mask_id) if mask_id in after else None, tuple(label_ids))


def cloze(cloze_ids: Cloze, input_ids, attention_mask, token_type_ids):
    """``(input_ids, attention_mask, token_type_ids, mask_positions)`` of the cloze rows: each
    row ``[CLS] text [SEP] pad`` (its real tokens: the mask's ones) becomes ``[CLS] before text
    after [SEP] pad``, ``len(before) + len(after)`` longer; pattern tokens have type 0."""
    batch, length = input_ids.shape
    before = jnp.asarray(cloze_ids.before, input_ids.dtype)
    after = jnp.asarray(cloze_ids.after, input_ids.dtype)
    b, a = len(cloze_ids.before), len(cloze_ids.after)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    real = jnp.sum(attention_mask, axis=1, keepdims=True)  # [B, 1], with [CLS] and [SEP]
    j = jnp.arange(length + b + a)[None]
    text_end = b + real - 1  # first position after the text
    in_before = (j >= 1) & (j < 1 + b)
    in_after = (j >= text_end) & (j < text_end + a)
    # Everything else is copied: [CLS] from 0, the text shifted by b, [SEP] (and padding) by
    # b + a.
    source = jnp.where(j < 1 + b, j, jnp.where(j < text_end, j - b, j - b - a))
    source = jnp.broadcast_to(jnp.clip(source, 0, length - 1), (batch, j.shape[1]))
    pattern = jnp.concatenate([before, after])
    from_pattern = pattern[jnp.clip(jnp.where(in_before, j - 1, j - text_end + b), 0, b + a - 1)]
    in_pattern = in_before | in_after
    mask = (j < text_end + a + 1).astype(attention_mask.dtype)
    ids = jnp.where(in_pattern, from_pattern, jnp.take_along_axis(input_ids, source, 1))
    ids = jnp.where(mask > 0, ids, 0)
    types = jnp.where(in_pattern | (mask == 0), 0, jnp.take_along_axis(token_type_ids, source, 1))
    if cloze_ids.mask_in_before is not None:
        positions = jnp.full((batch,), 1 + cloze_ids.mask_in_before)
    else:
        positions = text_end[:, 0] + cloze_ids.mask_in_after
    return ids, mask, types.astype(token_type_ids.dtype), jnp.clip(positions, 0, j.shape[1] - 1)


@register("pet")
@dataclasses.dataclass(frozen=True)
class PET(Method):
    """PET options (``config.method = dict(name='pet', ...)``).

    pattern: the cloze, with ``{text}`` for the input and one ``[MASK]``.
    verbalizer: one single-token word per label, in label order.
    vocab: the WordPiece ``vocab.txt`` the data was tokenised with (None: MiniLM's, the
        loader's default).
    embedding: the word table (the tied decoder). encoder: the layer stack. classifier: the
        head the verbaliser logits replace.
    also_train: extra path regexes that train (the encoder, as PET fine-tunes the model).
    Trainable: the head, ``d·d + 3·d + vocab``, plus ``also_train``.
    """

    pattern: str = "{text} It was [MASK]."
    verbalizer: tuple = ("terrible", "great")
    vocab: str | None = None
    embedding: str = "embeddings/word/embedding"
    encoder: str = "encoder"
    classifier: str = "classifier"
    also_train: tuple = ()
    tokens: Cloze = dataclasses.field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        object.__setattr__(self, "verbalizer", tuple(self.verbalizer)
                           if not isinstance(self.verbalizer, str) else self.verbalizer)
        object.__setattr__(self, "tokens", tokenize(self.pattern, self.verbalizer, self.vocab))
        object.__setattr__(self, "also_train", tuple(self.also_train or ()))
        if self.trainable is None:
            object.__setattr__(self, "trainable", (*self.own_leaves(), *self.also_train))

    def own_leaves(self) -> tuple[str, ...]:
        """Regexes of the method's own leaves."""
        return (rf"{HEAD}/.*",)

    def _table(self, flat):
        if self.embedding not in flat:
            raise ValueError(f"pet embedding={self.embedding!r} is not a parameter; closest: "
                             f"{', '.join(tree.closest_paths(self.embedding, flat))}")
        table = flat[self.embedding]
        largest = max(self.tokens.label_ids + self.tokens.before + self.tokens.after)
        if largest >= table.shape[0]:
            raise ValueError(f"pet: token id {largest} of the pattern or verbaliser is outside "
                             f"the {table.shape[0]}-row {self.embedding} (config.method.vocab "
                             f"is not the model's vocabulary)")
        return table

    def init(self, rng, params: dict, stats=None) -> dict:
        """A fresh masked-LM head: BERT's init (N(0, 0.02) kernel, zero biases, unit scale)."""
        del stats
        flat = dict(tree.flatten(params))
        vocab, width = self._table(flat).shape
        leaves = {"transform/kernel": INITIALIZER_RANGE * jax.random.normal(rng, (width, width)),
                  "transform/bias": jnp.zeros((width,)), "transform_norm/scale": jnp.ones((width,)),
                  "transform_norm/bias": jnp.zeros((width,)), "bias": jnp.zeros((vocab,))}
        flat.update({sites.join(HEAD, name): value for name, value in leaves.items()})
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        del shapes
        flat = dict(tree.flatten(logical))
        flat.update({sites.join(HEAD, name): axes for name, axes in AXES.items()})
        return tree.unflatten(flat)

    def head(self, flat: dict) -> dict:
        """The masked-LM head's params (a tree for :class:`MaskedLMHead`)."""
        missing = [name for name in AXES if sites.join(HEAD, name) not in flat]
        if missing:
            raise ValueError(f"pet head leaf {sites.join(HEAD, missing[0])!r} is not in the "
                             f"params (run init first)")
        return tree.unflatten({name: flat[sites.join(HEAD, name)] for name in AXES})

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        if tuple(module.input_names) != INPUTS:
            raise ValueError(f"pet reads text models with inputs {INPUTS}; this model takes "
                             f"{tuple(module.input_names)}")
        flat = tree.flatten(variables["params"])
        classifier = sites.join(self.classifier, "kernel")
        if classifier not in flat:
            raise ValueError(f"pet classifier={self.classifier!r} is not a module of this "
                             f"model; closest: {', '.join(tree.closest_paths(classifier, flat))}")
        classes = flat[classifier].shape[-1]
        if classes != len(self.verbalizer):
            raise ValueError(f"config.method.verbalizer has {len(self.verbalizer)} words; the "
                             f"model has num_classes={classes}")
        kwargs = dict(kwargs)
        given = dict(zip(INPUTS, args))
        given.update({name: kwargs.pop(name) for name in INPUTS if name in kwargs})
        ids, mask, types, positions = cloze(self.tokens, given["input_ids"],
                                            given.get("attention_mask"),
                                            given.get("token_type_ids"))
        if ids.shape[1] > module.config.max_length:
            raise ValueError(f"pet: sequence length {given['input_ids'].shape[1]} plus the "
                             f"pattern's {ids.shape[1] - given['input_ids'].shape[1]} tokens "
                             f"exceeds the model's max_length={module.config.max_length}")
        handler = functools.partial(
            _verbalizer_logits, encoder=self.encoder, positions=positions,
            head=functools.partial(MaskedLMHead(module.config).apply, {"params": self.head(flat)}),
            table=self._table(flat), label_ids=jnp.asarray(self.tokens.label_ids), rows={})
        with sites.intercept(handler, sites.at({self.encoder, self.classifier})):
            return Applied(module.apply(variables, ids, mask, types, *args[len(INPUTS):],
                                        **kwargs))

    def export(self, params: dict) -> dict:
        """The params as they are: the head is not the classifier's shape, so it stays beside
        the model under ``mlm/``."""
        return params


STACK_ARGS = ("x", "attention_mask", "deterministic", "last_rows")  # Stack.__call__'s


def _verbalizer_logits(call: sites.Call, encoder: str, positions, head, table, label_ids,
                       rows: dict):
    if call.path == encoder:  # every row, not [CLS] alone; keep the mask rows for the head
        args = {**dict(zip(STACK_ARGS, call.args)), **call.kwargs, "last_rows": None}
        out = call.run(**args)
        rows["mask"] = out[jnp.arange(out.shape[0]), positions]
        return out
    logits = head(rows["mask"][:, None], table)[:, 0]  # [B, vocab], float32
    return logits[:, label_ids]

