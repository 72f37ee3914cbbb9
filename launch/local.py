"""Run a multi-host job on this machine: ``python -m launch.local --processes 2 --devices 4 --
--config configs/NAME.py --workdir DIR [--config.key=value ...]``.

Starts ``--processes`` copies of ``launch.main`` joined over loopback, each with its share of
``--devices`` fake CPU devices and XLA's gloo collectives: the real multi-controller path of a
TPU pod or GPU cluster (global arrays, FSDP across processes, orbax multi-process checkpoints),
small enough for a laptop or a test. Process 0 prints to this terminal; every process also
writes ``--logs/process_I.log``. SIGTERM is passed on to every process (they save and stop at an
agreed step); the exit status is the first non-zero one, else 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile

from launch.main import Parser


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def commands(processes: int, devices: int, port: int, main_args: list[str]) -> list[tuple]:
    """``(argv, environment overrides)`` of each process."""
    if processes < 1:
        raise ValueError(f"--processes={processes} must be at least 1")
    if devices % processes:
        raise ValueError(f"--devices={devices} does not split evenly over --processes={processes}")
    env = {"JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}"}
    return [([sys.executable, "-m", "launch.main", *main_args, f"--coordinator=localhost:{port}",
              f"--num_processes={processes}", f"--process_id={index}"], env)
            for index in range(processes)]


def run(processes: int, devices: int, main_args: list[str], logs: str) -> int:
    os.makedirs(logs, exist_ok=True)
    children = []
    for index, (argv, env) in enumerate(commands(processes, devices, free_port(), main_args)):
        log = open(os.path.join(logs, f"process_{index}.log"), "wb")
        # Process 0's output goes to the terminal and its log; the others' to their logs only.
        children.append((subprocess.Popen(
            argv, env={**os.environ, **env}, stderr=subprocess.STDOUT,
            stdout=subprocess.PIPE if index == 0 else log), log))
    signal.signal(signal.SIGTERM, lambda *_: [c.send_signal(signal.SIGTERM) for c, _ in children])
    first, first_log = children[0]
    while chunk := first.stdout.read1(1 << 16):  # as it comes: progress bars end lines with \r
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        first_log.write(chunk)
    codes = [child.wait() for child, _ in children]
    for _, log in children:
        log.close()
    return next((code for code in codes if code), 0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, main_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = Parser(prog="python -m launch.local", description=__doc__)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--devices", type=int, required=True, help="fake CPU devices in all")
    parser.add_argument("--logs", default=None, help="log folder (default: a new temp folder)")
    args = parser.parse_args(ours)
    if not main_args:
        parser.error("nothing to run: give launch.main's arguments after '--'")
    logs = args.logs or tempfile.mkdtemp(prefix="scion_local_")
    try:
        return run(args.processes, args.devices, main_args, logs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
