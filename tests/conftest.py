"""Test session setup: 8 fake CPU devices (before JAX starts), single-threaded LAPACK,
float32 matmuls and a persistent compilation cache."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# LAPACK (SVDs) with OpenBLAS threads on a busy 2-core machine runs up to 50x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "mpl"))

import jax  # noqa: E402

from tests.cli_runs import COMPILATION_CACHE  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests build the same tiny programs: JAX's persistent cache compiles each once.
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
