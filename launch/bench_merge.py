"""Merging benchmark: ``python -m launch.bench merge`` (flags: ``python -m launch.bench_merge``).

One TIES merge (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging
Models") of three fine-tunes onto a base, all Llama-shaped Hugging Face checkpoints with random
float32 weights (~0.5B parameters each; ``--small`` for a few MB), run from the same mergekit
YAML by mergekit's CLI and by Scion's (``python -m launch.merge CONFIG OUT``), alternately, each
in its own subprocess: wall time (best of ``--repeats``) and peak resident memory (the child's
``ru_maxrss``) of each. Page caches cannot be dropped without root, so every input file is read
once, untimed, before the runs: both tools read from memory, and Scion's input bytes per second
is set against a large in-memory copy measured in the same run. Neither tool fsyncs its output
(mergekit never does; Scion runs with ``--no-fsync``, since a durable write runs at the disk's
speed, not the merge's). Both outputs are compared tensor by tensor. Prints ``key=value``
lines; the last is ``mergekit_over_scion`` (time).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPES = {  # LlamaConfig fields; "full" has 502M parameters, "small" 1.3M
    "full": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=26,
                 num_attention_heads=16, vocab_size=32000),
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, vocab_size=2000),
}
SHARD_BYTES = {"full": 1 << 30, "small": 1 << 20}  # several shards either way
MODELS = ("base", "ft_0", "ft_1", "ft_2")
WEIGHTS, DENSITIES = (0.5, 0.3, 0.2), (0.5, 0.7, 0.3)
BASE_STD, DELTA_STD = 0.02, 0.002  # deltas an order below the weights, as in a fine-tune
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama_shapes(hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 vocab_size: int, **_) -> dict[str, tuple[int, ...]]:
    """Hugging Face ``LlamaForCausalLM`` tensor names and shapes (untied head, full
    multi-head attention; ``nn.Linear`` weights are ``[out, in]``)."""
    shapes = {"model.embed_tokens.weight": (vocab_size, hidden_size)}
    for i in range(num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes[layer + "input_layernorm.weight"] = (hidden_size,)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{layer}self_attn.{name}.weight"] = (hidden_size, hidden_size)
        shapes[layer + "post_attention_layernorm.weight"] = (hidden_size,)
        shapes[layer + "mlp.gate_proj.weight"] = (intermediate_size, hidden_size)
        shapes[layer + "mlp.up_proj.weight"] = (intermediate_size, hidden_size)
        shapes[layer + "mlp.down_proj.weight"] = (hidden_size, intermediate_size)
    shapes["model.norm.weight"] = (hidden_size,)
    shapes["lm_head.weight"] = (vocab_size, hidden_size)
    return shapes


def shard_plan(shapes: dict, shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most ``shard_bytes`` (float32), a
    larger tensor alone in its shard."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_checkpoint(path: str, shape: dict, tensor, shard_bytes: int) -> None:
    """A sharded safetensors checkpoint (``model-0000i-of-0000n.safetensors`` + index) of
    ``tensor(index, name, shape)`` for every Llama tensor, and the ``config.json`` of
    ``transformers.LlamaConfig(**shape)``."""
    import transformers
    from safetensors.numpy import save_file

    os.makedirs(path)
    transformers.LlamaConfig(**shape, architectures=["LlamaForCausalLM"],
                             tie_word_embeddings=False, dtype="float32").save_pretrained(path)
    shapes = llama_shapes(**shape)
    index = {name: i for i, name in enumerate(shapes)}
    shards = shard_plan(shapes, shard_bytes)
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensor(index[n], n, shapes[n]) for n in names},
                  os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(4 * int(np.prod(s)) for s in shapes.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def ensure_checkpoints(root: str, shape_name: str, seed: int) -> dict[str, str]:
    """``MODELS`` under ``root/shape_name``, generated unless a stamp of the same shape, seed
    and scales says they are already there: a random base (norms at one), and fine-tunes
    that add small Gaussian deltas to it, each tensor from its own seed."""
    from safetensors import safe_open

    folder = os.path.join(root, shape_name)
    stamp = dict(shape=SHAPES[shape_name], shard_bytes=SHARD_BYTES[shape_name], seed=seed,
                 base_std=BASE_STD, delta_std=DELTA_STD, models=MODELS)
    stamp_file = os.path.join(folder, "stamp.json")
    paths = {name: os.path.join(folder, name) for name in MODELS}
    if os.path.exists(stamp_file):
        with open(stamp_file) as f:
            if json.load(f) == json.loads(json.dumps(stamp)):
                return paths

    def base(index, name, shape):
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        x = np.random.default_rng([seed, 0, index]).standard_normal(shape, np.float32)
        x *= BASE_STD
        return x

    def finetune(model):
        with open(os.path.join(paths["base"], "model.safetensors.index.json")) as f:
            files = json.load(f)["weight_map"]

        def tensor(index, name, shape):
            x = safe_open(os.path.join(paths["base"], files[name]), "numpy").get_tensor(name)
            delta = np.random.default_rng([seed, model, index]).standard_normal(shape,
                                                                                np.float32)
            delta *= DELTA_STD
            return x + delta
        return tensor

    shutil.rmtree(folder, ignore_errors=True)
    for model, (name, path) in enumerate(paths.items()):
        print(f"# generating {path}", file=sys.stderr, flush=True)
        write_checkpoint(path + ".tmp", SHAPES[shape_name], finetune(model) if model else base,
                         SHARD_BYTES[shape_name])
        os.replace(path + ".tmp", path)
    with open(stamp_file, "w") as f:
        json.dump(stamp, f)
    return paths


def ties_yaml(paths: dict[str, str]) -> str:
    """The mergekit TIES config over ``paths`` (base + fine-tunes)."""
    import yaml

    models = [dict(model=paths[name], parameters=dict(weight=w, density=d))
              for name, w, d in zip(MODELS[1:], WEIGHTS, DENSITIES)]
    return yaml.safe_dump(dict(models=models, base_model=paths["base"], merge_method="ties",
                               parameters=dict(normalize=True), dtype="float32"),
                          sort_keys=False)


def _files(checkpoint: str) -> list[str]:
    return sorted(glob.glob(os.path.join(checkpoint, "*.safetensors")))


def read_all(paths) -> int:
    """Reads every safetensors file under ``paths`` once (into the page cache); its bytes."""
    buffer, total = bytearray(64 << 20), 0
    for path in paths:
        for file in _files(path):
            with open(file, "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    total += n
    return total


def run_timed(command: list[str], log: str) -> tuple[float, int]:
    """Wall seconds and peak resident bytes of ``command`` run to completion in a
    subprocess (output to ``log``); a failure raises with the log's tail."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{tail}")
    return seconds, usage.ru_maxrss * 1024  # ru_maxrss is in kB on Linux


def copy_bytes_per_second(nbytes: int, repeats: int = 3) -> float:
    """Best of ``repeats`` ``np.copyto`` of an ``nbytes`` float32 array (pages touched
    first, so no page faults are timed)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def copy_rate_in_child(nbytes: int) -> float:
    """:func:`copy_bytes_per_second` in a child process: a forked child's ``ru_maxrss``
    starts from its parent's, so the copy's buffers must never live in this process."""
    code = f"from launch.bench_merge import copy_bytes_per_second as c; print(c({nbytes}))"
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True, cwd=REPO)
    return float(result.stdout)


def max_abs_difference(a: str, b: str) -> float:
    """Largest |a - b| over all tensors of two checkpoints, read one tensor at a time; a
    ValueError if their tensor names or shapes differ."""
    from safetensors import safe_open

    def where(checkpoint):
        return {name: file for file in _files(checkpoint)
                for name in safe_open(file, "numpy").keys()}

    files_a, files_b = where(a), where(b)
    if files_a.keys() != files_b.keys():
        raise ValueError(f"tensor names differ: only in {a}: "
                         f"{sorted(files_a.keys() - files_b.keys())[:5]}, only in {b}: "
                         f"{sorted(files_b.keys() - files_a.keys())[:5]}")
    worst = 0.0
    for name in sorted(files_a):
        x = safe_open(files_a[name], "numpy").get_tensor(name)
        y = safe_open(files_b[name], "numpy").get_tensor(name)
        if x.shape != y.shape:
            raise ValueError(f"{name}: shape {x.shape} in {a} but {y.shape} in {b}")
        worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))))
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench_merge")
    parser.add_argument("--small", action="store_true", help="a few-MB shape, to check quickly")
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "scion_bench_merge"),
                        help="where generated checkpoints are cached (and outputs written)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy-mb", type=int, default=None,
                        help="size of the in-memory copy [1024; 256 with --small]")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--mergekit-only", action="store_true")
    only.add_argument("--scion-only", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.mergekit_only and not os.path.exists(os.path.join(REPO, "launch", "merge.py")):
        parser.error("Scion's merge command (launch/merge.py) is missing: use --mergekit-only")

    shape_name = "small" if args.small else "full"
    paths = ensure_checkpoints(args.root, shape_name, args.seed)
    work = os.path.join(args.root, shape_name, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    config = os.path.join(work, "ties.yml")
    with open(config, "w") as f:
        f.write(ties_yaml(paths))
    bin_dir = os.path.dirname(sys.executable)
    # Default mergekit options, but for the tokenizer copy: there is none to copy, and trying
    # costs an AutoTokenizer load that fails.
    tools = {"mergekit": ([os.path.join(bin_dir, "mergekit-yaml"), "--no-copy-tokenizer"],
                          "import mergekit.merge"),
             "scion": ([sys.executable, "-m", "launch.merge", "--no-fsync"],
                       "import launch.merge")}
    if args.mergekit_only:
        del tools["scion"]
    if args.scion_only:
        del tools["mergekit"]

    # Untimed warm-up: inputs into the page cache, each tool's imports read once from disk.
    input_bytes = read_all(paths.values())
    for _, imports in tools.values():
        subprocess.run([sys.executable, "-c", imports], check=True, cwd=REPO)
    copy_mb = args.copy_mb or (256 if args.small else 1024)
    copy_rate = 0.0
    seconds = {tool: [] for tool in tools}
    peak = dict.fromkeys(tools, 0)
    for round_ in range(args.repeats):
        copy_rate = max(copy_rate, copy_rate_in_child(copy_mb << 20))
        for tool, (command, _) in tools.items():
            out = os.path.join(work, f"out_{tool}")
            shutil.rmtree(out, ignore_errors=True)
            s, rss = run_timed(command + [config, out], os.path.join(work, f"{tool}.log"))
            print(f"# round {round_}: {tool} {s:.1f} s, peak RSS {rss / 1e9:.2f} GB",
                  file=sys.stderr, flush=True)
            seconds[tool].append(s)
            peak[tool] = max(peak[tool], rss)

    shapes = llama_shapes(**SHAPES[shape_name])
    print(f"shape={shape_name}")
    print(f"params_per_model={sum(int(np.prod(s)) for s in shapes.values())}")
    print(f"models={len(MODELS)}")  # the base and three fine-tunes
    print(f"input_bytes={input_bytes}")
    print(f"largest_tensor_bytes={4 * max(int(np.prod(s)) for s in shapes.values())}")
    print("page_cache=warm (inputs read once, untimed, before the runs: no root to drop it)")
    print("output=page cache, no fsync (mergekit never fsyncs; Scion ran with --no-fsync)")
    print(f"copy_gb_per_s={copy_rate / 1e9:.2f}")
    for tool in tools:
        best = min(seconds[tool])
        print(f"{tool}_s={best:.2f}")
        print(f"{tool}_s_all={','.join(f'{s:.2f}' for s in seconds[tool])}")
        print(f"{tool}_peak_rss_gb={peak[tool] / 1e9:.3f}")
        print(f"{tool}_gb_per_s={input_bytes / best / 1e9:.3f}")
        print(f"{tool}_vs_copy={input_bytes / best / copy_rate:.4f}")
    if len(tools) == 2:
        difference = max_abs_difference(*(os.path.join(work, f"out_{t}") for t in tools))
        print(f"max_abs_difference={difference:.3g}")
        print(f"mergekit_over_scion={min(seconds['mergekit']) / min(seconds['scion']):.2f}")
    for tool in tools:
        shutil.rmtree(os.path.join(work, f"out_{tool}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
