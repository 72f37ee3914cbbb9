"""Run a mergekit YAML config on local Hugging Face checkpoints, out of core:

    python -m launch.merge CONFIG.yml OUT_DIR [--seed 0] [--max-shard-bytes 5000000000]
                                              [--no-fsync]

Writes a Hugging Face checkpoint (safetensors, config.json, tokenizer files) to OUT_DIR
atomically. Mistakes in the config or inputs end with one line naming them.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time


def _reuse_freed_memory() -> None:
    """glibc returns every tensor-sized block to the kernel when freed (munmap), so each read
    lands in fresh pages the kernel must fault in and zero again; kept in the heap, the next
    tensor reuses them (about 10% faster here, same peak). glibc only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters, from <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 40)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="mergekit YAML file")
    parser.add_argument("out_dir", help="output checkpoint directory (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random drops (DARE, DELLA)")
    parser.add_argument("--max-shard-bytes", type=int, default=5 * 10**9)
    parser.add_argument("--no-fsync", action="store_true",
                        help="publish without fsync: still atomic against a killed process, "
                             "not against a power loss (mergekit does not fsync either)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from launch.main import USER_ERRORS
    from research.merge import mergekit_config

    _reuse_freed_memory()
    start = time.perf_counter()
    try:
        tensors = mergekit_config.run(args.config, args.out_dir, seed=args.seed,
                                      max_shard_bytes=args.max_shard_bytes,
                                      durable=not args.no_fsync)
    except USER_ERRORS as err:
        message = err.args[0] if err.args else repr(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"tensors={len(tensors)}")
    print(f"seconds={time.perf_counter() - start:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
