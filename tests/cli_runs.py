"""Helpers of the tests that start real ``launch.main`` processes: the arguments of a tiny BERT
run on real data, and starting / waiting on processes with their logs kept for failures."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The runs of a test compile the same programs: JAX's persistent cache (keyed by the program,
# the flags and the JAX version, so safe to keep between sessions) compiles each once.
COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), "scion_test_jax_cache")

TINY_BERT = ("{'num_classes': 2, 'hidden_size': 32, 'num_heads': 4, 'mlp_dim': 64, "
             "'num_layers': 2, 'hidden_dropout': 0.0, 'attention_dropout': 0.0}")


def run_args(workdir, data_dir, *overrides) -> list[str]:
    """``launch.main`` arguments of a tiny BERT on Rotten Tomatoes, with ``overrides`` (each
    ``key=value``) on top."""
    return ["--config", "configs/minilm_rotten_tomatoes.py:quick", "--workdir", str(workdir),
            "--config.model.name=bert_tiny_classifier", "--config.model.pretrained=",
            f"--config.model.overrides={TINY_BERT}", f"--config.data.data_dir={data_dir}",
            "--config.train.final_eval_splits=()", "--config.train.batch_size=8",
            "--config.train.tensorboard=False",
            "--config.data.options={'max_length': 16}",
            *(f"--config.{item}" for item in overrides)]


def environment(devices: int, **extra) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_COMPILATION_CACHE_DIR": COMPILATION_CACHE,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def start(argv, log_path, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def finish(processes, logs, timeout=240) -> None:
    """Wait for every process; fail with the tails of their logs unless all exit 0."""
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in processes]
    finally:
        for p in processes:
            p.kill()
    tails = "\n".join(f"--- {log}\n{open(log).read()[-3000:]}" for log in logs)
    assert codes == [0] * len(processes), tails
