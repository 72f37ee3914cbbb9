"""LoRA benchmark: ``python -m launch.bench lora``.

MiniLM shapes (batch 32 x 64 tokens), rank 8 on every encoder kernel (query, key, value, out,
wi, wo), classifier and pooler trained whole, AdamW. Deterministic figures from XLA: step FLOPs
(``cost_analysis``) and argument + temporary bytes (``memory_analysis``) of the LoRA step
against the full fine-tuning step. Wall clock: Scion's LoRA step against Hugging Face PEFT's
LoRA step in PyTorch with the same shapes, rank, targets and optimizer (forward, backward,
clipping, AdamW), timed alternately in this one process, best-of. Prints ``key=value`` lines;
the last is the headline ``scion_over_peft_tokens_per_s``.
"""

from __future__ import annotations

RANK, ALPHA = 8, 16.0
LORA_METHOD = dict(name="lora", targets=((r"encoder/.*/kernel", RANK),), alpha=ALPHA,
                   also_train=(r"classifier/.*", r"pooler/.*"))
# The same modules in transformers' names: every Linear of every encoder layer.
PEFT_TARGETS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
                r"|attention\.output\.dense|intermediate\.dense|output\.dense)")


def _figures(compiled) -> tuple[float, int]:
    memory = compiled.memory_analysis()
    return (float(compiled.cost_analysis()["flops"]),
            int(memory.argument_size_in_bytes) + int(memory.temp_size_in_bytes))


def _peft_step(batch: dict):
    """A function running one PEFT LoRA training step in PyTorch on ``batch`` (numpy)."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
        intermediate_size=1536, max_position_embeddings=512, num_labels=2)
    model = peft.get_peft_model(
        transformers.BertForSequenceClassification(config),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS,
                        modules_to_save=["classifier", "pooler.dense"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-4, weight_decay=0.0)
    inputs = {k: torch.tensor(batch[k], dtype=torch.long)
              for k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = torch.tensor(batch["label"], dtype=torch.long)

    def step():
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in trainable)


def bench_lora(rounds: int = 5) -> None:
    import jax
    import numpy as np

    from launch.bench import (MINILM_BATCH, MINILM_LENGTH, _best_seconds, minilm_batch,
                              minilm_setup)
    from research import tree
    from research.train import loop

    # --- Deterministic: FLOPs and bytes of the compiled steps -------------------------------
    _, full = minilm_setup({"data": 1}, 100, dict(name="full"), jax.devices()[:1])
    full_flops, full_bytes = _figures(loop.make_train_step(full).lower(
        full.abstract_state, minilm_batch(full)).compile())

    config, setup = minilm_setup({"data": 1}, 100, LORA_METHOD, jax.devices()[:1])
    holder = {"state": loop.init_state(config, setup)}
    batch = minilm_batch(setup)
    compiled = loop.make_train_step(setup).lower(holder["state"], batch).compile()
    lora_flops, lora_bytes = _figures(compiled)
    scion_trainable = tree.count(holder["state"]["trainable"])

    # --- Wall clock: Scion LoRA vs PEFT LoRA, alternated -------------------------------------
    def scion_step():
        holder["state"] = compiled(holder["state"], batch)[0]
        return holder["state"]["step"]

    peft_step, peft_trainable = _peft_step({k: np.asarray(v) for k, v in batch.items()})
    scion_step(), peft_step()  # warm up both
    scion_seconds = peft_seconds = float("inf")
    for _ in range(rounds):
        scion_seconds = min(scion_seconds, _best_seconds(scion_step, 2))
        peft_seconds = min(peft_seconds, _best_seconds(peft_step, 2))
    tokens = MINILM_BATCH * MINILM_LENGTH

    print(f"backend={jax.default_backend()}")
    print(f"rank={RANK}")
    print(f"scion_trainable_params={scion_trainable}")
    print(f"peft_trainable_params={peft_trainable}")
    print(f"lora_step_gflop={lora_flops / 1e9:.2f}")
    print(f"full_step_gflop={full_flops / 1e9:.2f}")
    print(f"flops_ratio={lora_flops / full_flops:.4f}")
    print(f"lora_arg_plus_temp_bytes={lora_bytes}")
    print(f"full_arg_plus_temp_bytes={full_bytes}")
    print(f"bytes_ratio={lora_bytes / full_bytes:.4f}")
    print(f"scion_lora_step_seconds={scion_seconds:.4f}")
    print(f"peft_lora_step_seconds={peft_seconds:.4f}")
    print(f"scion_lora_tokens_per_s={tokens / scion_seconds:.0f}")
    print(f"peft_lora_tokens_per_s={tokens / peft_seconds:.0f}")
    print(f"scion_over_peft_tokens_per_s={peft_seconds / scion_seconds:.3f}")

