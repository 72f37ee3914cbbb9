"""Joining a multi-process run: ``jax.distributed`` from flags, the environment, or the cluster
auto-detection JAX has for SLURM and Cloud TPU.

Every process runs the same command; after :func:`initialize` each sees all devices of the job
(``jax.devices()``) and its own (``jax.local_devices()``), XLA's collectives (gloo on CPU) move
the data, and the coordinator's heartbeats end the job when a peer dies: the survivors exit
non-zero within ``--heartbeat_timeout`` seconds instead of waiting forever.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

MODES = ("auto", "on", "off")


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-process", "auto: join a job when a coordinator or process count is given (flags or "
        "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) or SLURM runs several "
        "tasks; on: always (TPU pods: everything auto-detected); off: never")
    group.add_argument("--distributed", choices=MODES, default="auto")
    group.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                       help="HOST:PORT of process 0")
    # String defaults go through ``type`` too: a bad environment value is argparse's one line.
    group.add_argument("--num_processes", type=int, default=os.environ.get("JAX_NUM_PROCESSES"))
    group.add_argument("--process_id", type=int, default=os.environ.get("JAX_PROCESS_ID"))
    group.add_argument("--init_timeout", type=int, default=300,
                       help="seconds to wait for every process to join")
    group.add_argument("--heartbeat_timeout", type=int, default=120,
                       help="seconds after which a silent peer counts as dead and the job ends")


def _slurm_tasks() -> int:
    from jax._src.clusters.slurm_cluster import SlurmCluster

    return SlurmCluster.get_process_count() if SlurmCluster.is_env_present() else 1


def wanted(args) -> bool:
    if args.distributed != "auto":
        return args.distributed == "on"
    given = (args.coordinator, args.num_processes, args.process_id)
    return any(value is not None for value in given) or _slurm_tasks() > 1


def _wait_until_reachable(coordinator: str, timeout: int) -> None:
    """Connect to the coordinator first: the runtime aborts the process (no exception, a C++
    stack) when it cannot, and a one-line error is more use. Retries, as process 0 may start
    later than the others."""
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator={coordinator!r} must look like HOST:PORT")
    deadline, error = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            return
        except OSError as err:
            error = err
            time.sleep(0.2)
    raise ValueError(f"could not reach coordinator {coordinator} within --init_timeout={timeout} s "
                     f"({error.strerror if error and error.strerror else error})")


def initialize(args) -> None:
    """Join the job ``args`` describe, or raise ValueError in one line naming what was wrong."""
    import jax
    from jax._src import clusters  # JAX's own detection, so its answer can be checked first

    env_ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    coordinator, processes, process_id, local_ids = (
        clusters.ClusterEnv.auto_detect_unset_distributed_params(
            args.coordinator, args.num_processes, args.process_id,
            [int(i) for i in env_ids.split(",")] if env_ids else None, None, args.init_timeout))
    missing = [flag for flag, value in (("--coordinator", coordinator),
                                        ("--num_processes", processes),
                                        ("--process_id", process_id)) if value is None]
    if missing:
        raise ValueError(f"cannot join a multi-process run: {', '.join(missing)} not given and "
                         "no SLURM or TPU environment to detect them from")
    if processes < 1:
        raise ValueError(f"--num_processes={processes} must be at least 1")
    if not 0 <= process_id < processes:
        raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={processes})")
    if process_id != 0:
        _wait_until_reachable(coordinator, args.init_timeout)
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=processes, process_id=process_id,
        local_device_ids=local_ids, initialization_timeout=args.init_timeout,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
        shutdown_timeout_seconds=args.heartbeat_timeout)
    devices, local = jax.device_count(), jax.local_device_count()
    if devices != local * processes:
        raise ValueError(f"{processes} processes do not match the {devices} devices: this process "
                         f"has {local}, every process needs the same number")
