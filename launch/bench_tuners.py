"""The tuners benchmark: ``python -m launch.bench tuners [--small] [--only a,b]``.

For each tuner, on MiniLM shapes (batch 32 x 64 tokens; ``--small``: a 2-layer BERT for a quick
check), the classifier (and pooler) trained beside it, AdamW: XLA's step FLOPs against full
fine-tuning's (deterministic), and the wall clock of Scion's step against PEFT's step for the
same tuner in PyTorch (same shapes, targets and optimizer; forward, backward, clipping, AdamW),
timed alternately in this one process, best-of. Tuners PEFT lacks (on CPU: QLoRA needs
bitsandbytes' CUDA kernels; BitFit is no PEFT type) report FLOPs and Scion's time only. Last
line: the geometric mean of ``peft_seconds / scion_seconds`` over the tuners PEFT has.
"""

from __future__ import annotations

import argparse
import math

HEAD = (r"classifier/.*", r"pooler/.*")
PEFT_HEAD = ["classifier", "pooler.dense"]
ENCODER = r"encoder/.*/kernel"
PEFT_LINEARS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
                r"|attention\.output\.dense|intermediate\.dense|output\.dense)")
ATTENTION = r"encoder/.*/attn/(query|value)/kernel"
IA3_TARGETS, IA3_FEEDFORWARD = r"encoder/.*/(attn/(key|value)|mlp/wo)/kernel", r".*/mlp/wo/kernel"
PEFT_IA3_TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(key|value)|output\.dense)"
PEFT_IA3_FEEDFORWARD = r".*encoder\.layer\.\d+\.output\.dense"


def _tuners() -> dict:
    """name -> (Scion method config, PEFT config factory or None)."""
    def lora(**extra):
        return lambda peft: peft.LoraConfig(r=8, lora_alpha=16.0, lora_dropout=0.0,
                                            target_modules=PEFT_LINEARS,
                                            modules_to_save=PEFT_HEAD, **extra)
    return {
        "lora_r8": (dict(name="lora", targets=((ENCODER, 8),), alpha=16.0, also_train=HEAD),
                    lora()),
        "dora_r8": (dict(name="dora", targets=((ENCODER, 8),), alpha=16.0, also_train=HEAD),
                    lora(use_dora=True)),
        # PEFT's step here never calls update_and_allocate; Scion's includes the allocator.
        "adalora_r12": (dict(name="adalora", targets=(ENCODER,), init_r=12, target_r=8,
                             alpha=16.0, also_train=HEAD),
                        lambda peft: peft.AdaLoraConfig(
                            init_r=12, target_r=8, lora_alpha=16.0, lora_dropout=0.0,
                            total_step=100, target_modules=PEFT_LINEARS,
                            modules_to_save=PEFT_HEAD)),
        "vera_r256": (dict(name="vera", targets=(ENCODER,), rank=256, also_train=HEAD),
                      lambda peft: peft.VeraConfig(r=256, target_modules=PEFT_LINEARS,
                                                   modules_to_save=PEFT_HEAD)),
        "loha_r8": (dict(name="loha", targets=((ENCODER, 8),), alpha=16.0, also_train=HEAD),
                    lambda peft: peft.LoHaConfig(r=8, alpha=16, target_modules=PEFT_LINEARS,
                                                 modules_to_save=PEFT_HEAD)),
        "lokr_r8": (dict(name="lokr", targets=((ENCODER, 8),), alpha=16.0, also_train=HEAD),
                    lambda peft: peft.LoKrConfig(r=8, alpha=16, target_modules=PEFT_LINEARS,
                                                 modules_to_save=PEFT_HEAD)),
        "qlora_nf4_r8": (dict(name="qlora", targets=((ENCODER, 8),), alpha=16.0,
                              also_train=HEAD), None),
        "ia3": (dict(name="ia3", targets=(IA3_TARGETS,), feedforward=(IA3_FEEDFORWARD,),
                     also_train=HEAD),
                lambda peft: peft.IA3Config(target_modules=PEFT_IA3_TARGETS,
                                            feedforward_modules=PEFT_IA3_FEEDFORWARD,
                                            modules_to_save=PEFT_HEAD)),
        "prompt_tuning": (dict(name="prompt_tuning", num_virtual_tokens=20, also_train=HEAD),
                          lambda peft: peft.PromptTuningConfig(
                              task_type="SEQ_CLS", num_virtual_tokens=20,
                              modules_to_save=PEFT_HEAD)),
        "p_tuning": (dict(name="p_tuning", num_virtual_tokens=20, encoder_hidden_size=128,
                          also_train=HEAD),
                     lambda peft: peft.PromptEncoderConfig(
                         task_type="SEQ_CLS", num_virtual_tokens=20, encoder_hidden_size=128,
                         modules_to_save=PEFT_HEAD)),
        # PEFT 0.21's prefix forward fails on transformers 5's BERT (``past_key_values`` was
        # renamed), so there is no PEFT step to time.
        "prefix_tuning": (dict(name="prefix_tuning", num_virtual_tokens=20, also_train=HEAD),
                          None),
        "houlsby_rf16": (dict(name="houlsby", reduction_factor=16,
                              also_train=(*HEAD, r"encoder/.*_norm/(scale|bias)")), None),
        "pfeiffer_rf16": (dict(name="pfeiffer", reduction_factor=16, also_train=HEAD), None),
        "ssf": (dict(name="ssf", also_train=HEAD), None),
        "diffscaler_r8": (dict(name="diffscaler", rank=8, also_train=HEAD), None),
        "side_tuning_w64": (dict(name="side_tuning", width=64, heads=4, also_train=HEAD), None),
        "vqt_q1": (dict(name="vqt", num_queries=1, also_train=HEAD), None),
        "levi_w64": (dict(name="levi", width=64, heads=4, also_train=HEAD), None),
        "ln_tuning": (dict(name="ln_tuning", also_train=(r"pooler/.*",)),
                      lambda peft: peft.LNTuningConfig(
                          target_modules=[r"LayerNorm"], modules_to_save=PEFT_HEAD)),
        "bitfit": (dict(name="bitfit", also_train=(r"pooler/.*",)), None),
    }


def _bert_config(small: bool) -> dict:
    if small:
        return dict(vocab_size=30522, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128)
    return dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, mlp_dim=1536)


def _scion(method: dict, small: bool, batch_rows: int, length: int):
    """``(step, state holder, batch, compiled)`` for Scion's step with ``method``."""
    import numpy as np

    from configs import common
    from research.train import loop

    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.model.name = "bert_tiny_classifier" if small else "minilm_l6_classifier"
    shape = _bert_config(small)
    config.model.overrides = dict(num_classes=2, **(shape if small else {}))
    config.train.batch_size = batch_rows
    config.mesh = {"data": 1}
    config.method = method
    config.optim.learning_rate = 5e-4
    import jax
    setup = loop.make_setup(config, loop.build_model(config), 100, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1000, 30000, (batch_rows, length)).astype(np.int32),
             "attention_mask": np.ones((batch_rows, length), np.int32),
             "token_type_ids": np.zeros((batch_rows, length), np.int32),
             "label": rng.integers(0, 2, (batch_rows,)).astype(np.int32)}
    placed = loop.global_batch(setup, batch)
    holder = {"state": loop.init_state(config, setup)}
    compiled = loop.make_train_step(setup).lower(holder["state"], placed).compile()

    def step():
        holder["state"] = compiled(holder["state"], placed)[0]
        return holder["state"]["step"]
    return step, batch, compiled


def _peft(factory, small: bool, batch: dict):
    """A function running one PEFT training step in PyTorch on ``batch`` (numpy)."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(2)
    torch.manual_seed(0)
    shape = _bert_config(small)
    config = transformers.BertConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
        intermediate_size=shape["mlp_dim"], max_position_embeddings=512, num_labels=2)
    model = peft.get_peft_model(transformers.BertForSequenceClassification(config), factory(peft))
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
    return step


def bench_tuners(argv=()) -> None:
    from launch.bench import _best_seconds

    parser = argparse.ArgumentParser(prog="python -m launch.bench tuners")
    parser.add_argument("--small", action="store_true", help="a 2-layer BERT, batch 8 x 16")
    parser.add_argument("--only", default="", help="comma-separated tuner names")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(list(argv))
    tuners = _tuners()
    names = [n for n in args.only.split(",") if n] or list(tuners)
    unknown = [n for n in names if n not in tuners]
    if unknown:
        raise SystemExit(f"error: --only {unknown[0]!r} is not one of {sorted(tuners)}")
    rows, length = (8, 16) if args.small else (32, 64)

    _, _, full = _scion(dict(name="full"), args.small, rows, length)
    full_flops = float(full.cost_analysis()["flops"])
    print(f"full_step_gflop={full_flops / 1e9:.3f}")
    speedups = []
    for name in names:
        method, factory = tuners[name]
        scion_step, batch, compiled = _scion(method, args.small, rows, length)
        print(f"{name}_flops_ratio={float(compiled.cost_analysis()['flops']) / full_flops:.4f}")
        scion_step()
        peft_step = _peft(factory, args.small, batch) if factory else None
        if peft_step:
            peft_step()
        scion_seconds = peft_seconds = float("inf")
        for _ in range(args.rounds):
            scion_seconds = min(scion_seconds, _best_seconds(scion_step, 2))
            if peft_step:
                peft_seconds = min(peft_seconds, _best_seconds(peft_step, 2))
        print(f"{name}_scion_seconds={scion_seconds:.4f}")
        if peft_step:
            print(f"{name}_peft_seconds={peft_seconds:.4f}")
            print(f"{name}_peft_over_scion={peft_seconds / scion_seconds:.3f}")
            speedups.append(peft_seconds / scion_seconds)
    mean = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else float("nan")
    print(f"geomean_peft_over_scion={mean:.3f}")
