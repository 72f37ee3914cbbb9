"""DePT (Shi & Lipani, 2024, "DePT: Decomposed Prompt Tuning for Parameter-Efficient
Fine-tuning"): split a soft prompt's parameter budget into a shorter prompt ``P [l, embed]`` and
a low-rank update of the input embeddings, ``X' = X + s·A·B`` with ``A [positions, r]``,
``B [r, embed]`` and ``s = alpha / sqrt(r)``; the two parts train with different learning rates.

The update is per *sequence position*, as in the paper and its code (``lora_embedding_A`` is
``[max_length, r]``), not per vocabulary row. In BERT, adding ``ΔX[i]`` to the word vector at
input position ``i`` is the same as adding it to row ``i`` of the position table, provided the
text keeps its positions. So the pair is a LoRA pair on ``embeddings/position/embedding``
(LoRA's names and layout): LoRA's interception adds it, and :func:`lora.merge` folds it into the
position table, leaving a plain model plus the prompt.

The prompt goes right after [CLS], so the classifier still reads [CLS] at index 0. Interception
(no model edit) at four sites: the embeddings module gets ``l`` placeholder ids (token type 0)
after [CLS]; the word table's rows for them become the prompt; the position lookup gives the
text its original positions (0..L-1) and the prompt none; the encoder sees ``L + l`` tokens with
the prompt always attended and drops the prompt rows from its output, so every head sees ``L``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp

from research import sites, tree
from research.lowrank import lora as lora_lib
from research.methods import Applied, Method, register

PROMPT = "prompt"


def _insert(x, rows):
    """``x [B, L, ...]`` with ``rows [B, l, ...]`` put in after position 0 ([CLS])."""
    return jnp.concatenate([x[:, :1], rows.astype(x.dtype), x[:, 1:]], axis=1)


def _drop(y, n: int):
    """``y`` without the ``n`` rows after position 0 (inverse of :func:`_insert`)."""
    return jnp.concatenate([y[:, :1], y[:, 1 + n:]], axis=1)


@register("dept")
@dataclasses.dataclass(frozen=True)
class DePT(Method):
    """DePT options (``config.method = dict(name='dept', ...)``).

    prompt_length: ``l``, soft prompt vectors after [CLS], initialised from the word-table rows
        of ``l`` vocabulary ids drawn uniformly (Lester et al., 2021's sampled-vocabulary init).
    rank, alpha: the pair's rank and scale ``alpha / sqrt(rank)`` (DePT's code); ``A`` starts
        U(±1/sqrt(rank)) and ``B`` at zero, as there, so a fresh pair changes nothing.
    embedding, positions: paths of the word and position tables (BERT's by default).
    encoder: path of the module that takes ``(x, attention_mask, deterministic)``.
    also_train: extra path regexes that train (the classifier head, say).
    Trainable: ``l·embed + rank·(max_length + embed)`` plus ``also_train``. The two learning
    rates are ``config.optim.lr_multipliers`` rules over :attr:`prompt_path` and the factors.
    """

    prompt_length: int = 20
    rank: int = 4
    alpha: float = 8.0
    embedding: str = "embeddings/word/embedding"
    positions: str = "embeddings/position/embedding"
    encoder: str = "encoder"
    also_train: tuple = ()

    def __post_init__(self):
        for key in ("prompt_length", "rank"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DePT {key}={value!r} is not a positive integer")
        if sites.parent(sites.parent(self.embedding)) != sites.parent(sites.parent(self.positions)):
            raise ValueError(f"DePT embedding={self.embedding!r} and positions="
                             f"{self.positions!r} are not tables of one embeddings module")
        object.__setattr__(self, "also_train", tuple(self.also_train or ()))
        if self.trainable is None:
            factors = re.escape(sites.parent(self.positions)) + r"/lora_(a|b)"
            object.__setattr__(self, "trainable",
                               (re.escape(self.prompt_path), factors, *self.also_train))

    @property
    def prompt_path(self) -> str:
        return f"{sites.parent(sites.parent(self.embedding))}{tree.SEP}{PROMPT}"

    @property
    def lora(self) -> lora_lib.LoRA:
        """The LoRA that owns the pair: ``lora.merge(params, dept.lora)`` folds it in."""
        return lora_lib.LoRA(targets=((re.escape(self.positions), self.rank),),
                             alpha=self.alpha, rslora=True)

    def _require(self, flat, key: str):
        path = getattr(self, key)
        if path not in flat:
            raise ValueError(f"DePT {key}={path!r} is not a parameter; closest: "
                             f"{', '.join(tree.closest_paths(path, flat))}")
        return flat[path]

    def init(self, rng, params: dict, stats=None) -> dict:
        del stats
        flat = dict(tree.flatten(params))
        table = self._require(flat, "embedding")
        self._require(flat, "positions")
        target = self.lora.plan(params)[self.positions]  # checks the rank fits
        prompt_key, a_key = jax.random.split(rng)
        rows = jax.random.randint(prompt_key, (self.prompt_length,), 0, table.shape[0])
        flat[self.prompt_path] = jnp.take(table, rows, axis=0)
        module, (length, width), dtype = sites.parent(self.positions), target.shape, table.dtype
        # torch's kaiming_uniform_(a=sqrt(5)) on DePT's A [max_length, r]: fan_in is r.
        bound = 1.0 / math.sqrt(self.rank)
        flat[f"{module}/{lora_lib.A}"] = jax.random.uniform(
            a_key, (length, self.rank), dtype, -bound, bound)
        flat[f"{module}/{lora_lib.B}"] = jnp.zeros((self.rank, width), dtype)
        return tree.unflatten(flat)

    def logical_axes(self, logical: dict, shapes: dict) -> dict:
        flat = dict(tree.flatten(self.lora.logical_axes(logical, shapes)))
        flat[self.prompt_path] = (None, "embed")
        return tree.unflatten(flat)

    def apply(self, module, variables, *args, **kwargs) -> Applied:
        flat = tree.flatten(variables["params"])
        if self.prompt_path not in flat:
            raise ValueError(f"DePT prompt {self.prompt_path!r} is not in the params "
                             f"(run DePT.init first)")
        if not any(path.startswith(self.encoder + tree.SEP) for path in flat):
            modules = {sites.parent(path) for path in flat}
            raise ValueError(f"DePT encoder={self.encoder!r} is not a module; closest: "
                             f"{', '.join(tree.closest_paths(self.encoder, sorted(modules)))}")
        word, position = sites.parent(self.embedding), sites.parent(self.positions)
        handler = functools.partial(_with_prompt, prompt=flat[self.prompt_path], word=word,
                                    position=position, embeddings=sites.parent(word))
        with sites.intercept(handler, sites.at({sites.parent(word), word, position,
                                                self.encoder})):
            return self.lora.apply(module, variables, *args, **kwargs)

    def export(self, params: dict) -> dict:
        """The positional pair merged into the table; the prompt stays (it cannot fold)."""
        return self.lora.export(params)


def _with_prompt(call: sites.Call, prompt, word: str, position: str, embeddings: str):
    n = prompt.shape[0]
    if call.path == embeddings:  # (input_ids, token_type_ids, deterministic)
        ids, types, *rest = call.args
        room = jnp.zeros((ids.shape[0], n), ids.dtype)
        return call.run(_insert(ids, room), _insert(types, room), *rest, **call.kwargs)
    if call.path == word:
        y = call.output()
        return _insert(_drop(y, n), jnp.broadcast_to(prompt, (y.shape[0], *prompt.shape)))
    if call.path == position:
        # The text keeps positions 0..L-1, so the pair's row i updates input token i as in
        # DePT; the prompt gets no position (a free vector needs no fixed offset).
        (ids,) = call.args
        text = jnp.concatenate([ids[:, :1], ids[:, 1 + n:] - n], axis=1)
        y = call.run(_insert(text, jnp.zeros((ids.shape[0], n), ids.dtype)), **call.kwargs)
        return _insert(_drop(y, n), jnp.zeros((y.shape[0], n, y.shape[2])))
    x, mask, *rest = call.args  # the encoder: (x, attention_mask, deterministic)
    if mask is not None:
        mask = _insert(mask, jnp.ones((mask.shape[0], n), mask.dtype))
    return _drop(call.run(x, mask, *rest, **call.kwargs), n)
