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



VARIANTS = {  # row name -> config spec; each runs its experiment's method and optimizer
    "full": "configs/minilm_rotten_tomatoes.py",
    "lora_r8": "configs/minilm_lora.py",
    "dora_r8": "configs/minilm_dora.py",
    "pissa_r8": "configs/minilm_pissa.py",
    "corda_r8": "configs/minilm_corda.py",
    "colora_288": "configs/minilm_colora.py",
    "pego_k4r2": "configs/minilm_pego.py",
    "pela_r96": "configs/minilm_pela.py",
    "dept": "configs/minilm_dept.py",
}


def bench_variants(rounds: int = 3) -> None:
    """Step time of every low-rank experiment's training step on the MiniLM shapes (random
    weights: same shapes and FLOPs), compiled once each and timed alternately in this one
    process, best-of. Prints trainable parameters, step FLOPs, seconds and tokens/s per
    variant; the last line is the LoRA step's speed over full fine-tuning's."""
    import jax

    from launch.bench import MINILM_BATCH, MINILM_LENGTH, _best_seconds, minilm_batch
    from research import tree
    from research.train import config as config_lib
    from research.train import loop

    runs = {}
    for name, spec in VARIANTS.items():
        config = config_lib.load(spec, ["model.pretrained=", "train.batch_size=32"])
        setup = loop.make_setup(config, loop.build_model(config), 100,
                                devices=jax.devices()[:1])
        state = loop.init_state(config, setup)
        batch = minilm_batch(setup)
        compiled = loop.make_train_step(setup).lower(state, batch).compile()
        holder = {"state": state}

        def step(compiled=compiled, holder=holder, batch=batch):
            holder["state"] = compiled(holder["state"], batch)[0]
            return holder["state"]["step"]

        step()
        runs[name] = (step, tree.count(state["trainable"]), tree.count(
            tree.combine(state["trainable"], state["frozen"])),
            float(compiled.cost_analysis()["flops"]))
    seconds = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, (step, *_) in runs.items():
            seconds[name] = min(seconds[name], _best_seconds(step, 2))
    tokens = MINILM_BATCH * MINILM_LENGTH
    print(f"backend={jax.default_backend()}")
    for name, (_, trainable, total, flops) in runs.items():
        print(f"{name}_trainable_params={trainable}")
        print(f"{name}_total_params={total}")
        print(f"{name}_step_gflop={flops / 1e9:.2f}")
        print(f"{name}_step_seconds={seconds[name]:.4f}")
        print(f"{name}_tokens_per_s={tokens / seconds[name]:.0f}")
    print(f"lora_r8_over_full_tokens_per_s={seconds['full'] / seconds['lora_r8']:.3f}")
