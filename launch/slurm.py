"""Run a config on a SLURM GPU cluster: write an sbatch script and submit it.

    python -m launch.slurm --config configs/NAME.py[:args] --workdir /shared/RUN \\
        --nodes 2 --gpus_per_node 8 [--tasks per_gpu|per_node] [--partition P] [--account A] \\
        [--time 24:00:00] [--dry-run] [-- --config.key=value ...]

Every task runs the same entry point, ``launch.main --distributed=on``: JAX's SLURM detection
gives each its process count and index (``SLURM_NTASKS``, ``SLURM_PROCID``); the script names
the coordinator, process 0 on the first node of the job. ``--tasks per_gpu`` starts one process
per GPU, ``per_node`` one per node that drives all the node's GPUs.

Time limits and preemption: Slurm warns the batch shell ahead of the time limit; the shell asks
every task to save (SIGTERM; they exit 0) and puts the job back in the queue, where it resumes
from that checkpoint. Where the cluster preempts by requeueing, ``--requeue`` lets it requeue
this job, which resumes the same way.

The script is written to ``WORKDIR/slurm/job.sbatch``; the job's logs go to ``WORKDIR/logs``
(``JOBID.out`` for the script, ``JOBID_TASK.log`` per task). The checkout and the workdir must be
on a filesystem every node sees at the same path. The job installs the checkout's ``.venv`` with
``bash launch/setup.sh --cuda`` on its first node before it starts the tasks (once: later jobs
find it installed); to install ahead from a login node, which has no GPU, run
``SCION_SKIP_DEVICE_CHECK=1 bash launch/setup.sh --cuda`` there.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from launch import main as entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds between Slurm's warning and the time limit: enough to write a checkpoint. Slurm may
# send it up to a minute earlier.
SAVE_SECONDS = 180
# The job's install, run by the batch shell: on a node with the GPUs a login node lacks.
SETUP = "bash launch/setup.sh --cuda"


def sbatch_lines(args) -> list:
    per_node_tasks = args.gpus_per_node if args.tasks == "per_gpu" else 1
    options = [("job-name", args.job_name), ("nodes", args.nodes),
               ("ntasks-per-node", per_node_tasks), ("gpus-per-node", args.gpus_per_node),
               ("cpus-per-task", args.cpus_per_task), ("time", args.time),
               ("partition", args.partition), ("account", args.account),
               ("output", os.path.join(args.workdir, "logs", "%j.out")),
               # A requeued job keeps its id: append rather than overwrite the first part's log.
               ("open-mode", "append"), ("signal", f"B:USR1@{SAVE_SECONDS}")]
    return ([f"#SBATCH --{key}={shlex.quote(str(value))}" for key, value in options
             if value is not None] + ["#SBATCH --requeue"])


def script(args, passthrough: list) -> str:
    """The sbatch script that runs ``launch.main`` with ``args`` (parsed flags) and the
    pass-through arguments."""
    run = [".venv/bin/python", "-m", "launch.main", "--config", args.config,
           "--workdir", args.workdir, "--distributed=on", *passthrough]
    srun = ["srun", "--kill-on-bad-exit=1", "--open-mode=append",
            f"--output={os.path.join(args.workdir, 'logs', '%j_%t.log')}"]
    devices = []
    if args.tasks == "per_node":
        # JAX's SLURM detection would give each process only the GPU numbered SLURM_LOCALID.
        ids = ",".join(str(index) for index in range(args.gpus_per_node))
        devices = [f"export JAX_LOCAL_DEVICE_IDS={ids}"]
    return "\n".join([
        "#!/bin/bash", *sbatch_lines(args),
        "# Written by python -m launch.slurm.",
        "set -euo pipefail",
        f"cd {shlex.quote(ROOT)}",
        "# The CUDA build into the shared checkout's .venv; a no-op once it is installed.",
        SETUP,
        # The port follows the job id so jobs sharing a node differ, and the restart count so a
        # requeued job does not wait for its last run's socket; the range is above Linux's
        # ephemeral ports, as JAX's own choice.
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        'export JAX_COORDINATOR_ADDRESS="$head_node:$((61440 + (SLURM_JOB_ID + '
        '${SLURM_RESTART_COUNT:-0}) % 4096))"',
        *devices,
        "# USR1 (--signal): the time limit is near. The tasks save and exit 0 on SIGTERM, then",
        "# the job goes back in the queue. A SIGTERM to this shell (preemption) must not end it",
        "# before the tasks have saved.",
        "requeue=0",
        """trap 'requeue=1; scancel --signal=TERM "$SLURM_JOB_ID"' USR1""",
        "trap : TERM",
        f"{shlex.join(srun + run)} &",
        "step=$!",
        # A trap cuts `wait` short; wait again while srun runs, then take its exit status.
        'while kill -0 "$step" 2>/dev/null; do wait "$step" || true; done',
        'wait "$step"',
        'if (( requeue )); then scontrol requeue "$SLURM_JOB_ID"; fi',
        "",
    ])


def submit(text: str, workdir: str) -> str:
    """Write the script to ``workdir/slurm/job.sbatch`` atomically (a reader never sees half of
    it) and make the log folder; the script's path."""
    folder = os.path.join(workdir, "slurm")
    os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=".job.sbatch.")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    path = os.path.join(folder, "job.sbatch")
    os.replace(tmp, path)
    return path


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def parse_args(argv):
    parser = entry.Parser(prog="python -m launch.slurm", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:args]")
    parser.add_argument("--workdir", required=True,
                        help="checkpoints, metrics and logs: a path every node shares")
    parser.add_argument("--nodes", type=positive, default=1)
    parser.add_argument("--gpus_per_node", type=positive, required=True)
    parser.add_argument("--tasks", choices=("per_gpu", "per_node"), default="per_gpu",
                        help="one process per GPU, or one per node driving all its GPUs")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00; default: the partition's")
    parser.add_argument("--job_name", default="scion")
    parser.add_argument("--cpus_per_task", type=positive)
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, passthrough = parser.parse_args(argv[:cut]), argv[cut + 1:]
    if "://" in args.workdir:
        parser.error(f"--workdir={args.workdir!r}: Slurm writes the job's logs there, so it must "
                     "be a path on a filesystem every node shares")
    if not os.path.isfile(os.path.join(ROOT, args.config.split(":")[0])):
        parser.error(f"--config={args.config!r}: no such file in {ROOT}")
    # A bad override would otherwise surface only once the job has its nodes.
    entry.parse_args(["--config", args.config, "--workdir", args.workdir, *passthrough])
    args.workdir = os.path.abspath(args.workdir)  # the job runs from the checkout, not from here
    return args, passthrough


def main(argv=None) -> int:
    args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    text = script(args, passthrough)
    if args.dry_run:
        print(text, end="")
        return 0
    path = submit(text, args.workdir)
    if shutil.which("sbatch") is None:
        print(f"error: sbatch is not on PATH (run this on a Slurm login node); the script is "
              f"{path}", file=sys.stderr)
        return 1
    return subprocess.run(["sbatch", path]).returncode


if __name__ == "__main__":
    sys.exit(main())
