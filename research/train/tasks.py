"""Losses for the three tasks the zoo's heads serve: classification, masked LM, causal LM.

Each task turns a batch into model inputs and returns *sums* (loss, correct predictions, count),
so gradient accumulation, padded evaluation batches and multi-host reductions all average
correctly by dividing once at the end. Batches may carry ``valid`` (0 for padding rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

TASKS = ("classification", "masked_lm", "causal_lm")


def _valid(batch, n: int) -> jax.Array:
    return batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones((n,), jnp.float32)


def mask_tokens(rng, input_ids, attention_mask, *, mask_id: int, vocab_size: int,
                rate: float = 0.15, special_ids=(0, 100, 101, 102, 103)):
    """BERT's masking: pick ``rate`` of the real tokens; of those 80% -> [MASK], 10% -> random,
    10% unchanged. Returns ``(masked_ids, targets_weight)``."""
    pick_key, kind_key, random_key = jax.random.split(rng, 3)
    maskable = attention_mask.astype(bool)
    for special in special_ids:
        maskable &= input_ids != special
    picked = maskable & (jax.random.uniform(pick_key, input_ids.shape) < rate)
    kind = jax.random.uniform(kind_key, input_ids.shape)
    random_ids = jax.random.randint(random_key, input_ids.shape, 0, vocab_size)
    masked = jnp.where(picked & (kind < 0.8), mask_id, input_ids)
    masked = jnp.where(picked & (kind >= 0.8) & (kind < 0.9), random_ids, masked)
    return masked, picked.astype(jnp.float32)


def model_inputs(model, batch, rng, *, training: bool) -> tuple[dict, dict]:
    """``(inputs for module.apply, targets)`` for the model's task."""
    inputs = {name: batch[name] for name in model.module.input_names if name in batch}
    if model.task == "classification":
        return inputs, {"label": batch["label"], "weight": _valid(batch, batch["label"].shape[0])}
    if model.task == "masked_lm":
        rng = rng if training else jax.random.key(0)  # fixed masks make evaluation comparable
        masked, weight = mask_tokens(rng, batch["input_ids"], batch["attention_mask"],
                                     mask_id=model.config.mask_token_id,
                                     vocab_size=model.config.vocab_size)
        weight = weight * _valid(batch, weight.shape[0])[:, None]
        return {**inputs, "input_ids": masked}, {"label": batch["input_ids"], "weight": weight}
    if model.task == "causal_lm":
        # SFT batches carry clean ``labels`` (Masked Thought corrupts only the inputs) and a
        # ``target_mask``: only the target span is scored.
        weight = batch["attention_mask"][:, 1:].astype(jnp.float32)
        if "target_mask" in batch:
            weight = weight * batch["target_mask"][:, 1:]
        weight = weight * _valid(batch, weight.shape[0])[:, None]
        labels = batch.get("labels", batch["input_ids"])
        return inputs, {"label": labels[:, 1:], "weight": weight}
    raise ValueError(f"model task {model.task!r} is not one of {TASKS}")


def loss_sums(model, logits, targets) -> dict:
    """Summed loss, correct predictions and weight (divide by ``count`` for means)."""
    if model.task == "causal_lm":
        logits = logits[:, :-1]
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets["label"])
    correct = (jnp.argmax(logits, -1) == targets["label"]).astype(jnp.float32)
    weight = targets["weight"]
    return {"loss": jnp.sum(losses * weight), "correct": jnp.sum(correct * weight),
            "count": jnp.sum(weight)}


def chunked_loss_sums(head, hidden, targets, chunk_tokens: int) -> dict:
    """:func:`loss_sums` of a causal LM from its final hidden states ``hidden`` [B, L, E],
    with ``head`` (hidden -> float32 logits) applied to about ``chunk_tokens`` tokens at a time:
    blocks of positions across the whole batch (so every data shard works on each block), in a
    rematerialised scan, so neither pass ever holds more than one block's logits (a 128k
    vocabulary's [8·1024, 128256] float32 logits are 4.2 GB)."""
    hidden, labels, weight = hidden[:, :-1], targets["label"], targets["weight"]
    batch, length = labels.shape
    positions = max(1, min(length, chunk_tokens // batch))
    blocks = -(-length // positions)

    def by_block(x):  # [B, L, ...] -> [blocks, B, positions, ...], padded with weight 0
        x = jnp.pad(x, [(0, 0), (0, blocks * positions - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(batch, blocks, positions, *x.shape[2:]), 0, 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_block(totals, xs):
        x, label, w = xs
        logits = head(x).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, label)
        correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
        return (totals[0] + jnp.sum(losses * w), totals[1] + jnp.sum(correct * w)), None

    zero = jnp.zeros((), jnp.float32)
    (loss, correct), _ = jax.lax.scan(one_block, (zero, zero),
                                      (by_block(hidden), by_block(labels), by_block(weight)))
    return {"loss": loss, "correct": correct, "count": jnp.sum(weight)}


def means(sums: dict) -> dict:
    """Turn summed metrics into means (``accuracy`` from ``correct``; a method's loss terms,
    summed the same way, keep their names)."""
    count = max(float(sums["count"]), 1.0)
    terms = {k: float(v) / count for k, v in sums.items()
             if k not in ("loss", "correct", "count", "grad_norm")}
    return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count,
            **terms}
