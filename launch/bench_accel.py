"""Accelerator benchmark: ``python -m launch.bench accel [--small] [--out FILE]``.

What it measures, on whatever backend JAX finds (one device, ``jax.devices()[0]``):

* Workloads: Llama-3.2-1B's shapes (zoo preset ``llama_1b_lm``, tied head), batch 8 x 1024
  tokens, AdamW, bfloat16 compute with float32 trainable params; ``--small``: ``llama_tiny_lm``
  (untied head), batch 8 x 128, which runs on a CPU in a minute or two. Two steps of each: LoRA
  r16 (alpha 16) on all seven projections (query, key, value, out, gate, up, down) with the base
  frozen, and full fine-tuning. LoRA runs first, so that a device's running peak memory (which
  JAX cannot reset) is LoRA's own at LoRA's figures and full fine-tuning's after it.
* Engine settings (flags; the defaults are the fast ones): ``--scan`` (one block scanned over
  the stacked layers), ``--remat dots_no_batch``, ``--attention fused``, ``--loss_chunk 4096``
  tokens per chunk of the cross-entropy, ``--dtype bfloat16``.
* Scion, per workload: ``compile_seconds`` (lowering + XLA compilation of the jitted, donated
  step), ``step_seconds`` (the best of ``--rounds`` x 2 timed steps after 2 warm-up steps),
  ``tokens_per_s`` = batch x length / step_seconds, ``model_flops`` = 6·N·T for full
  fine-tuning and 4·N·T for LoRA (a frozen base has no weight gradients), N = matmul weight
  parameters (every kernel, plus the embedding when it is tied as the LM head; no norms; the
  adapters' own FLOPs are not counted), T = tokens per step; ``mfu`` = model_flops /
  step_seconds / the device kind's spec bf16 dense peak (:data:`SPEC_PEAKS`; an unknown kind,
  a CPU say, gets none) and ``mfu_matmul`` = the same over the measured rate of one large matmul
  (bf16 8192^3 on GPU/TPU; float32 2048^3 on CPU, ``launch.bench.matmul_rate``; the best of
  the runs interleaved with that workload's steps: ``{lora,full}_matmul_flops_per_s``);
  ``xla_flops`` = XLA's ``cost_analysis()`` FLOPs of the compiled step (it counts a scanned
  loop's body once, so with ``--scan`` the layers count as one: printed, never used in a
  ratio); ``compiled_bytes`` = the compiled step's ``memory_analysis()`` argument +
  output + temporary bytes less the aliased (donated) ones, which are both argument and output
  and so counted once; on GPU/TPU also ``peak_bytes`` = ``memory_stats()['peak_bytes_in_use']``
  of the device (the process's running peak).
* PyTorch, when importable, in the same process and on the same device (``cuda`` if available,
  else ``cpu``): ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` with the same shapes
  (random init, ``attn_implementation="sdpa"``, the preset's tied/untied head), the same batch,
  loss, gradient clipping (1.0) and AdamW (``fused=True`` on CUDA). Full fine-tuning
  (``torch_full_*``) and LoRA through ``peft.get_peft_model`` with r16, alpha 16, no dropout on
  q/k/v/o/gate/up/down_proj (``peft_lora_*``). On CUDA under ``torch.autocast(bfloat16)`` with
  float32 master weights (for ``--dtype bfloat16``); on a CPU in float32 (``torch_precision``
  says which). Each runs eager and compiled (``torch.compile`` of the same module, so both
  share weights and optimizer state; ``compile_seconds`` is its first call, one step
  included); a compilation that fails prints ``peft_compile_error=...`` (or
  ``torch_full_compile_error=...``) and the run goes on. On CUDA ``peak_bytes`` is
  ``torch.cuda.max_memory_allocated``, reset before each variant's steps. Where JAX runs on a
  device PyTorch has not (a TPU), PyTorch is skipped (``torch_skipped=...``) and the headline
  is ``nan``.
  On a CPU that other processes keep busy, PyTorch's OpenMP team of several threads stalls
  whenever one of them is descheduled (a 2-core machine under load: a 15 ms step took 1.4 s
  with 2 threads, 17 ms with 1); ``--torch_threads 1`` avoids that.
* Scion and PyTorch steps are timed alternately, round by round, so that both see the same
  machine conditions; the device's memory is freed between the two workloads.

Every figure prints as ``key=value`` when it is measured (and is appended to ``--out FILE``,
so a run killed by a timeout leaves what it reached); the last line is the headline
``scion_over_peft_tokens_per_s``: Scion's LoRA tokens/s over PEFT's eager LoRA tokens/s.
"""

from __future__ import annotations

import os

# Before JAX starts: allocate device memory as needed (not 75% up front), so that PyTorch in
# the same process finds room on the same GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

from research.models.layers import ATTENTION_IMPLS, REMAT_POLICIES  # noqa: E402

RANK, ALPHA = 16, 16.0
LORA_METHOD = dict(name="lora", targets=((r".*/(query|key|value|out|gate|up|down)/kernel", RANK),),
                   alpha=ALPHA)
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORKLOADS = ("lora", "full")  # in this order: see the module docstring on peak memory
PREFIXES = {"full": "torch_full", "lora": "peft_lora"}  # PyTorch's figures per workload
COMPILE_ERRORS = {"full": "torch_full_compile_error", "lora": "peft_compile_error"}
LEARNING_RATE = 1e-5

# Spec bf16 dense peak FLOP/s per device, as ``(regex over device_kind, peak)`` rules, first
# match wins (case-insensitive search).
SPEC_PEAKS = (
    (r"h200", 989e12), (r"h100", 989e12), (r"a100", 312e12), (r"\bl4\b", 121e12),
    (r"v5 ?lite|v5e", 197e12), (r"v5p|tpu v5$", 459e12), (r"v6 ?lite|v6e", 918e12),
    (r"tpu v4", 275e12),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    preset: str = "llama_1b"
    batch: int = 8
    length: int = 1024
    dtype: str = "bfloat16"
    scan: bool = True
    remat: str = "dots_no_batch"
    attention: str = "fused"
    loss_chunk: int = 4096
    rounds: int = 3
    warmup: int = 2
    torch_threads: int = 0  # PyTorch's intra-op threads; 0: its default

    @property
    def tokens(self) -> int:
        return self.batch * self.length


SMALL = dict(preset="llama_tiny", batch=8, length=128)


# ---------------------------------------------------------------------------------------------
# Arithmetic: FLOPs, peaks, MFU
# ---------------------------------------------------------------------------------------------


def spec_peak(device_kind: str) -> float | None:
    """The spec bf16 dense peak FLOP/s of a device kind, or None when unknown (a CPU)."""
    for pattern, peak in SPEC_PEAKS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return peak
    return None


def matmul_weights(model) -> int:
    """N: parameters that enter a matmul per token. Every kernel, and the embedding table when
    it is tied as the LM head (an untied table is a lookup, no FLOPs); norms are not counted."""
    from research import tree

    tied = model.config.tie_word_embeddings
    return sum(math.prod(leaf.shape) for path, leaf in tree.flatten(model.param_shapes()).items()
               if path.endswith("/kernel") or (tied and path.endswith("/embedding")))


def model_flops(weights: int, tokens: int, workload: str) -> float:
    """6·N·T for full fine-tuning (forward 2, backward 2 for activations + 2 for weights);
    4·N·T for LoRA over a frozen base (no weight gradients)."""
    return float({"full": 6, "lora": 4}[workload] * weights * tokens)


def accelerator_matmul(device) -> tuple[Callable, float, str]:
    """A function timing one large matmul on ``device``, its FLOPs, and what it is: bf16
    8192^3 on GPU/TPU, float32 2048^3 (``launch.bench.matmul_rate``) on a CPU."""
    import jax
    import jax.numpy as jnp

    if device.platform == "cpu":
        from launch.bench import matmul_rate
        fn, flops = matmul_rate(2048)
        return fn, flops, "float32_2048"
    size = 8192
    a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16), device)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    return (lambda: matmul(a, b)), 2.0 * size**3, "bfloat16_8192"


class Figures:
    """``key=value`` lines, printed (and appended to ``out``) as they come; ``values`` keeps
    the unrounded numbers."""

    def __init__(self, out: str | None = None):
        self.out, self.values = out, {}

    def __call__(self, key: str, value, spec: str = ".6g") -> None:
        self.values[key] = value
        line = f"{key}={value:{spec}}" if isinstance(value, float) else f"{key}={value}"
        print(line, flush=True)
        if self.out:
            with open(self.out, "a") as file:
                file.write(line + "\n")


def _best(fn: Callable, repeats: int, sync: Callable) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _jax_sync(value):
    import jax
    jax.block_until_ready(value)


# ---------------------------------------------------------------------------------------------
# Scion
# ---------------------------------------------------------------------------------------------


def scion_config(settings: Settings, workload: str):
    from configs import common

    config = common.base_config()
    config.model.name = f"{settings.preset}_lm"
    config.model.overrides = dict(dtype=settings.dtype)
    config.model.scan_layers = settings.scan
    config.model.remat = settings.remat
    config.model.attention_impl = settings.attention
    config.train.batch_size = settings.batch
    config.train.loss_chunk = settings.loss_chunk
    config.mesh = {"data": 1}
    config.method = LORA_METHOD if workload == "lora" else dict(name="full")
    config.optim.learning_rate = LEARNING_RATE
    return config


def token_batch(vocab_size: int, settings: Settings):
    import numpy as np

    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, vocab_size, (settings.batch, settings.length),
                                      dtype=np.int32),
            "attention_mask": np.ones((settings.batch, settings.length), np.int32)}


def train_step(config, setup):
    """The loop's jitted, donated step as ``loop.train`` builds it (the loss chunk travels in
    the setup)."""
    from research.train import loop

    return loop.make_train_step(setup, int(config.train.get("grad_accum", 1)),
                                config.train.get("rng_impl", "unsafe_rbg"))


class ScionRun:
    """One workload's state on ``device``, its compiled step and XLA's figures of it."""

    def __init__(self, settings: Settings, workload: str, device):
        import jax

        from research import tree
        from research.train import loop

        config = scion_config(settings, workload)
        model = loop.build_model(config)
        setup = loop.make_setup(config, model, 1000, devices=[device])
        self.state = loop.init_state(config, setup)
        self.batch = loop.global_batch(setup, token_batch(model.config.vocab_size, settings))
        self.trainable_params = tree.count(self.state["trainable"])
        jax.block_until_ready(self.state)
        start = time.perf_counter()
        self.compiled = train_step(config, setup).lower(self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - start
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.xla_flops = float(cost["flops"])
        memory = self.compiled.memory_analysis()
        self.compiled_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                  + memory.temp_size_in_bytes - memory.alias_size_in_bytes)

    def step(self):
        self.state = self.compiled(self.state, self.batch)[0]
        return self.state["step"]

    def close(self) -> None:
        import jax
        for leaf in jax.tree.leaves((self.state, self.batch)):
            leaf.delete()
        self.state = self.batch = self.compiled = None


def device_peak_bytes(device) -> int | None:
    """The device's running peak of bytes in use (GPU/TPU), None where it keeps none (CPU)."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------


def torch_available() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(name) for name in ("torch", "transformers", "peft"))


def torch_precision(cuda: bool, dtype: str) -> str:
    """PyTorch's counterpart of Scion's compute ``dtype``: bf16 autocast over float32 master
    weights on CUDA; float32 on a CPU (its bf16 kernels there are no fair baseline)."""
    return "autocast_bfloat16_float32_master" if cuda and dtype == "bfloat16" else "float32"


class TorchRun:
    """The same workload in PyTorch: HF Llama (PEFT LoRA for ``lora``), AdamW, one module
    called eagerly or through ``torch.compile`` (:meth:`variant`), sharing weights."""

    def __init__(self, model_config, settings: Settings, workload: str, batch: dict):
        import torch
        import transformers

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        c = model_config
        hf_config = transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.mlp_dim,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
            max_position_embeddings=c.max_length, rms_norm_eps=c.norm_eps,
            rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
            attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
        torch.manual_seed(0)
        with self.device:
            model = transformers.LlamaForCausalLM(hf_config)
        if workload == "lora":
            import peft
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS))
        model.train()
        self.model = model
        self.autocast = torch_precision(self.cuda, settings.dtype) != "float32"
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.trainable)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LEARNING_RATE, weight_decay=0.0,
                                           **({"fused": True} if self.cuda else {}))
        self.ids = torch.tensor(batch["input_ids"], dtype=torch.long, device=self.device)
        self.mask = torch.tensor(batch["attention_mask"], dtype=torch.long, device=self.device)

    def variant(self, compiled: bool) -> Callable:
        """A function running one training step, eager or through ``torch.compile``."""
        torch = self.torch
        forward = torch.compile(self.model) if compiled else self.model

        def step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.autocast):
                loss = forward(input_ids=self.ids, attention_mask=self.mask,
                               labels=self.ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    def sync(self, value) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        else:
            value.item()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.cuda else None

    def close(self) -> None:
        self.model = self.optimizer = self.trainable = self.ids = self.mask = None
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:500]


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def _emit_speed(emit: Figures, prefix: str, seconds: float, flops: float, tokens: int,
                peak: float | None, matmul_peak: float) -> None:
    emit(f"{prefix}_step_seconds", seconds)
    emit(f"{prefix}_tokens_per_s", tokens / seconds, ".1f")
    if peak:
        emit(f"{prefix}_mfu", flops / seconds / peak, ".4f")
    emit(f"{prefix}_mfu_matmul", flops / seconds / matmul_peak, ".4f")


def run(settings: Settings, emit: Figures, *, torch_eager: bool = True,
        torch_compile: bool = True, peak: float | None = None) -> dict:
    """Measure and emit every figure (see the module docstring); returns ``emit.values``.
    ``peak`` replaces the spec peak (a test's fake one)."""
    import jax

    from research.train import loop

    device = jax.devices()[0]
    kind = device.device_kind
    peak = peak or spec_peak(kind)
    use_torch = (torch_eager or torch_compile) and torch_available()
    tokens = settings.tokens
    emit("backend", jax.default_backend())
    emit("device_kind", kind)
    for field in dataclasses.fields(settings):
        if field.name != "torch_threads":  # printed as PyTorch has it, below
            emit(field.name, getattr(settings, field.name))
    emit("tokens_per_step", tokens)
    if peak:
        emit("spec_peak_flops_per_s", peak, ".4e")
    matmul, matmul_flops, matmul_kind = accelerator_matmul(device)
    emit("matmul", matmul_kind)
    matmul_seconds = _best(matmul, 3, _jax_sync)
    model = loop.build_model(scion_config(settings, "full"))
    model_config, weights = model.config, matmul_weights(model)
    emit("matmul_weight_params", weights)
    if use_torch:
        import torch
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        cuda = torch.cuda.is_available()
        if device.platform != "cpu" and not (cuda and device.platform == "gpu"):
            # A TPU, say: PyTorch has no step on this device, and its CPU is no comparison.
            emit("torch_skipped", f"no PyTorch device matches {device.platform}")
            use_torch = False
        else:
            emit("torch_device", "cuda" if cuda else "cpu")
            emit("torch_precision", torch_precision(cuda, settings.dtype))
            emit("torch_threads", torch.get_num_threads())

    for workload in WORKLOADS:
        name = f"scion_{workload}"
        scion = ScionRun(settings, workload, device)
        flops = model_flops(weights, tokens, workload)
        emit(f"{name}_trainable_params", scion.trainable_params)
        emit(f"{name}_compile_seconds", scion.compile_seconds, ".3f")
        emit(f"{name}_model_flops", flops, ".4e")
        emit(f"{name}_xla_flops", scion.xla_flops, ".4e")
        emit(f"{name}_compiled_bytes", scion.compiled_bytes)
        for _ in range(settings.warmup):
            _jax_sync(scion.step())

        # name -> (step function, sync, figure prefix, torch run or None)
        timed = {name: (scion.step, _jax_sync, None)}
        torch_run = None
        if use_torch:
            prefix = PREFIXES[workload]
            torch_run = TorchRun(model_config, settings, workload,
                                 token_batch(model_config.vocab_size, settings))
            emit(f"{prefix}_trainable_params", torch_run.trainable_params)
            variants = [("eager", False)] * torch_eager + [("compile", True)] * torch_compile
            for label, compiled in variants:
                key = f"{prefix}_{label}"
                try:
                    step = torch_run.variant(compiled)
                    start = time.perf_counter()
                    torch_run.sync(step())  # a compiled module compiles on its first call
                    if compiled:  # the first call: compilation and one step
                        emit(f"{prefix}_compile_seconds", time.perf_counter() - start, ".3f")
                    for _ in range(settings.warmup - 1):
                        torch_run.sync(step())
                except Exception as err:  # noqa: BLE001 - any failure of torch.compile
                    if not compiled:
                        raise
                    emit(COMPILE_ERRORS[workload], _one_line(err))
                    continue
                timed[key] = (step, torch_run.sync, torch_run)

        # Alternate: every contestant once per round, best of two steps each time.
        seconds = {key: float("inf") for key in timed}
        peaks = {key: 0 for key in timed}
        for _ in range(settings.rounds):
            matmul_seconds = min(matmul_seconds, _best(matmul, 3, _jax_sync))
            for key, (step, sync, owner) in timed.items():
                if owner is not None:
                    owner.reset_peak()
                seconds[key] = min(seconds[key], _best(step, 2, sync))
                if owner is not None and owner.peak_bytes() is not None:
                    peaks[key] = max(peaks[key], owner.peak_bytes())
        matmul_peak = matmul_flops / matmul_seconds
        emit(f"{workload}_matmul_flops_per_s", matmul_peak, ".4e")
        for key in timed:
            _emit_speed(emit, key, seconds[key], flops, tokens, peak, matmul_peak)
            if key == name:
                device_peak = device_peak_bytes(device)
                if device_peak is not None:
                    emit(f"{name}_peak_bytes", device_peak)
            elif peaks[key]:
                emit(f"{key}_peak_bytes", peaks[key])

        # Free the device before the next workload.
        scion.close()
        if torch_run is not None:
            torch_run.close()
        del scion, torch_run, timed
        gc.collect()

    values = emit.values
    peft = values.get("peft_lora_eager_tokens_per_s", math.nan)  # nan: no PyTorch here
    emit("scion_over_peft_tokens_per_s", values["scion_lora_tokens_per_s"] / peft, ".3f")
    return values


def parse(argv=None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m launch.bench accel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="llama_tiny_lm, batch 8 x 128 (runs on a CPU)")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--remat", default=Settings.remat, choices=REMAT_POLICIES)
    parser.add_argument("--attention", default=Settings.attention, choices=ATTENTION_IMPLS)
    parser.add_argument("--loss_chunk", type=int, default=Settings.loss_chunk)
    parser.add_argument("--dtype", default=Settings.dtype,
                        choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--batch", type=int, help="rows per step (default 8)")
    parser.add_argument("--length", type=int, help="tokens per row (1024; --small: 128)")
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                        help="also the PyTorch steps (when torch, transformers, peft import)")
    parser.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="PyTorch's intra-op threads (0: its default); 1 on a busy CPU")
    parser.add_argument("--out", help="append every key=value line to this file as it comes")
    args = parser.parse_args(argv)
    base = SMALL if args.small else {}
    settings = Settings(**{**base, **{k: v for k, v in dict(
        batch=args.batch, length=args.length).items() if v is not None}},
        dtype=args.dtype, scan=args.scan, remat=args.remat, attention=args.attention,
        loss_chunk=args.loss_chunk, rounds=args.rounds, torch_threads=args.torch_threads)
    return settings, args


def main(argv=None) -> None:
    settings, args = parse(argv)
    run(settings, Figures(args.out), torch_eager=args.torch,
        torch_compile=args.torch and args.torch_compile)


if __name__ == "__main__":
    main()
