"""Run a config on a Cloud TPU VM or pod slice, every worker at once:

    python -m launch.tpu --name NAME --zone ZONE --accelerator v4-32 \\
        --config configs/NAME.py[:args] --workdir /gcs/BUCKET/RUN [--queued] [--spot] \\
        [--dry-run] [-- --config.key=value ...]

The steps are gcloud commands, built as data first so that ``--dry-run`` prints exactly what
would run: reuse the TPU VM (or queued resource) when it is there, otherwise create it (one
preempted or failed is deleted and created again); pack this checkout's files as they are now
(tracked and new, not ignored: uncommitted edits go too) and copy them to every worker; install
with ``bash launch/setup.sh --tpu`` (the TPU build of the pinned jax and its pinned libtpu,
``requirements-tpu.txt``); run ``launch.main --distributed=on`` on every worker (JAX reads the
pod's coordinator, process count and index from the TPU metadata), each worker appending its
output to a log named by its hostname; finally copy those logs into ``--logs``, also after a
failed run.

Rerunning the same command resumes: a preempted run saved its state (SIGTERM) in the workdir.
With several workers the workdir must be one folder they all see at the same path (checkpoints
are written by every worker, metrics by worker 0): a Cloud Storage bucket mounted with gcsfuse,
or a Filestore share.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from typing import NamedTuple

from launch import main as entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR, REMOTE_TARBALL, REMOTE_LOGS = "scion", "scion.tar.gz", "scion_logs"  # in $HOME
# The runtime (OS image) Google documents for JAX per TPU generation; v4 and older: the base.
RUNTIMES = {"v6e": "v2-alpha-tpuv6e", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5e": "v2-alpha-tpuv5-lite"}
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"
# States after which the VM is gone for good: a spot VM is deleted and created again.
DEAD_STATES = ("PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED")
POLL_SECONDS = 30

NOTES = {
    "probe": "is it there? (prints its state; a failure means it is missing)",
    "delete": "only if it was preempted or failed, to create it afresh",
    "create": "only if the check above failed (or it was just deleted)",
    "wait": f"repeated every {POLL_SECONDS} s until it prints ACTIVE",
    "pack": "pack the files this lists, as they are now, into {tarball}",
    "copy": "",
    "install": "",
    "train": "on every worker at once; each appends its output to ~/"
             f"{REMOTE_LOGS}/$(hostname).log",
    "collect": "always, also after a failed run",
}


class Step(NamedTuple):
    kind: str  # a key of NOTES: it says when the command runs
    argv: list


def runtime_version(accelerator: str) -> str:
    return RUNTIMES.get(accelerator.split("-")[0], DEFAULT_RUNTIME)


def install_command() -> str:
    """What each worker runs to unpack the code and install it (idempotent: reruns are fast)."""
    return " && ".join([
        f"mkdir -p ~/{REMOTE_DIR}", f"cd ~/{REMOTE_DIR}",
        # Keep the virtualenv and pip's cache of the last launch: building them takes minutes.
        "find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name .cache -exec rm -rf {} +",
        f"tar -xzf ~/{REMOTE_TARBALL}",
        # TPU images are Ubuntu 22.04, whose python3 is 3.10; Scion needs 3.11. The lock
        # timeout waits out the unattended upgrades a fresh VM runs.
        "{ command -v python3.11 >/dev/null || { sudo add-apt-repository -y ppa:deadsnakes/ppa"
        " && sudo apt-get -o DPkg::Lock::Timeout=600 install -y python3.11-venv; }; }",
        # setup.sh checks for the TPU before it installs: a worker without one stops here.
        "bash launch/setup.sh --tpu",
    ])


def train_command(args, passthrough: list) -> str:
    """What each worker runs. ``tee -p`` keeps writing the log when the launcher's connection
    drops, so the run goes on without it."""
    run = [".venv/bin/python", "-m", "launch.main", "--config", args.config,
           "--workdir", args.workdir, "--distributed=on", *passthrough]
    return (f"set -o pipefail; mkdir -p ~/{REMOTE_LOGS} && cd ~/{REMOTE_DIR} && "
            f"{shlex.join(run)} 2>&1 | tee -a -p ~/{REMOTE_LOGS}/$(hostname).log")


def plan(args, passthrough: list) -> list:
    """The launch as :class:`Step` s, in the order they run."""
    def gcloud(*words):
        project = [f"--project={args.project}"] if args.project else []
        return ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}", *project]

    name, spot = args.name, ["--spot"] if args.spot else []
    runtime = args.version or runtime_version(args.accelerator)
    if args.queued:
        state = gcloud("queued-resources", "describe", name, "--format=value(state.state)")
        steps = [Step("probe", state),
                 Step("delete", gcloud("queued-resources", "delete", name, "--force", "--quiet")),
                 Step("create", gcloud("queued-resources", "create", name, f"--node-id={name}",
                                       f"--accelerator-type={args.accelerator}",
                                       f"--runtime-version={runtime}", *spot)),
                 Step("wait", state)]
    else:
        steps = [Step("probe", gcloud("tpu-vm", "describe", name, "--format=value(state)")),
                 Step("delete", gcloud("tpu-vm", "delete", name, "--quiet")),
                 Step("create", gcloud("tpu-vm", "create", name,
                                       f"--accelerator-type={args.accelerator}",
                                       f"--version={runtime}", *spot))]
    # A queued resource's TPU VM is its node, named by --node-id: the same commands reach it.
    return steps + [
        Step("pack", ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                      "--exclude-standard"]),
        Step("copy", gcloud("tpu-vm", "scp", tarball_path(args), f"{name}:{REMOTE_TARBALL}",
                            "--worker=all")),
        Step("install", gcloud("tpu-vm", "ssh", name, "--worker=all",
                               f"--command={install_command()}")),
        Step("train", gcloud("tpu-vm", "ssh", name, "--worker=all",
                             f"--command={train_command(args, passthrough)}")),
        Step("collect", gcloud("tpu-vm", "scp", f"{name}:{REMOTE_LOGS}/*", args.logs,
                               "--worker=all")),
    ]


def tarball_path(args) -> str:
    # Beside the logs: the code a run used stays next to what it printed.
    return os.path.join(args.logs, "code.tar.gz")


def dry_run_text(steps: list, tarball: str) -> str:
    lines = []
    for step in steps:
        if NOTES[step.kind]:
            lines.append("# " + NOTES[step.kind].format(tarball=tarball))
        lines.append(shlex.join(step.argv))
    return "\n".join(lines)


def pack(root: str, names: list, tarball: str) -> None:
    """``names`` (paths under ``root``) into a gzipped tarball; listed files since deleted are
    skipped."""
    with tarfile.open(tarball, "w:gz") as tar:
        for name in names:
            if os.path.isfile(os.path.join(root, name)):
                tar.add(os.path.join(root, name), arcname=name)


def _run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.run(argv, **kwargs)


def _wait_active(argv: list) -> None:
    while (state := _run(argv, check=True, capture_output=True, text=True).stdout.strip()) \
            != "ACTIVE":
        if state in DEAD_STATES:
            raise RuntimeError(f"the queued resource is {state}: rerun to request it again")
        print(f"queued resource: {state or 'no state yet'}", file=sys.stderr, flush=True)
        time.sleep(POLL_SECONDS)


def execute(steps: list, tarball: str) -> int:
    """Run ``steps`` as their kinds say; the exit status of the run on the workers."""
    state, status = None, 0
    for step in steps:
        if step.kind == "probe":
            found = _run(step.argv, capture_output=True, text=True)
            state = found.stdout.strip() if found.returncode == 0 else None
        elif step.kind == "delete":
            if state in DEAD_STATES:
                _run(step.argv, check=True)
                state = None
        elif step.kind == "create":
            if state is None:
                _run(step.argv, check=True)
        elif step.kind == "wait":
            _wait_active(step.argv)
        elif step.kind == "pack":
            listing = _run(step.argv, check=True, capture_output=True).stdout
            pack(ROOT, [name for name in listing.decode().split("\0") if name], tarball)
        elif step.kind == "train":
            status = _run(step.argv).returncode
        else:
            _run(step.argv, check=True)
    return status


def parse_args(argv):
    parser = entry.Parser(prog="python -m launch.tpu", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
    parser.add_argument("--accelerator", required=True, help="e.g. v4-32, v5litepod-16, v6e-8")
    parser.add_argument("--config", required=True, help="configs/NAME.py[:args]")
    parser.add_argument("--workdir", required=True,
                        help="checkpoints and metrics; with several workers a folder they all "
                             "share, such as a gcsfuse mount /gcs/BUCKET/RUN")
    parser.add_argument("--project", help="default: gcloud's configured project")
    parser.add_argument("--version", help="TPU runtime; default: the one Google documents for "
                        f"JAX on that TPU generation ({DEFAULT_RUNTIME} for v4 and older)")
    parser.add_argument("--queued", action="store_true",
                        help="request a queued resource and wait until it is ACTIVE")
    parser.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    parser.add_argument("--logs", help="local folder for the workers' logs; default "
                        "tpu_logs/NAME")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, passthrough = parser.parse_args(argv[:cut]), argv[cut + 1:]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", args.name):
        parser.error(f"--name={args.name!r}: expected lowercase letters, digits and '-', "
                     "starting with a letter")
    if not re.fullmatch(r"v\d+[a-z]*-\d+", args.accelerator):
        parser.error(f"--accelerator={args.accelerator!r}: expected GENERATION-SIZE such as "
                     "v4-32 or v5litepod-16")
    if not os.path.isfile(os.path.join(ROOT, args.config.split(":")[0])):
        parser.error(f"--config={args.config!r}: no such file in {ROOT}")
    # The workers would reject a bad override only after the TPU is up: check it here.
    entry.parse_args(["--config", args.config, "--workdir", args.workdir, *passthrough])
    args.logs = args.logs or os.path.join("tpu_logs", args.name)
    return args, passthrough


def main(argv=None) -> int:
    args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    tarball = tarball_path(args)
    try:
        steps = plan(args, passthrough)
        if args.dry_run:
            print(dry_run_text(steps, tarball))
            return 0
        for tool in ("gcloud", "git"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not on PATH (the launcher needs the Google Cloud "
                                   "CLI and git)")
        os.makedirs(args.logs, exist_ok=True)
        return execute(steps, tarball)
    except subprocess.CalledProcessError as err:
        print(f"error: exit status {err.returncode}: {shlex.join(err.cmd)}", file=sys.stderr)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
