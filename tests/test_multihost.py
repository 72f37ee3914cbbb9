"""The real multi-host path on one machine: processes joined by ``jax.distributed`` over
loopback with gloo collectives and fake CPU devices, started by the local launcher or by
(faked) SLURM. Two processes equal one, checkpoints restore across process counts, a dead peer
ends the job, and bad input is one line."""

import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from launch import local
from research.train import checkpoint
from tests.cli_runs import ROOT, environment, finish, run_args, start

FSDP = "mesh={'data': 1, 'fsdp': 4, 'tensor': 1}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def launch_local(processes, workdir, data_dir, *overrides, logs):
    argv = ["-m", "launch.local", "--processes", str(processes), "--devices", "4", "--logs",
            str(logs), "--", *run_args(workdir, data_dir, FSDP, *overrides)]
    return start(argv, f"{logs}.out", environment(4))


def slurm_port() -> int:
    """A free port where JAX's SLURM detection looks: 61440 + job id % 4096."""
    for port in np.random.default_rng().permutation(np.arange(61440, 65536)):
        with socket.socket() as sock:
            try:
                sock.bind(("localhost", int(port)))
                return int(port)
            except OSError:
                continue
    raise RuntimeError("no free port in SLURM's range")


def launch_fake_slurm(workdir, data_dir, *overrides, logs):
    """Two tasks of a one-node SLURM step, as ``srun -n 2`` would start them: no coordinator or
    process flags, only SLURM's variables."""
    job = slurm_port() - 61440
    return [start(["-m", "launch.main", *run_args(workdir, data_dir, FSDP, *overrides)],
                  f"{logs}_{task}.out",
                  environment(2, SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="localhost",
                              SLURM_NTASKS="2", SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
                              SLURM_STEP_NUM_NODES="1"))
            for task in range(2)]


def params_at(workdir):
    manager = checkpoint.make_manager(str(workdir))
    step = manager.latest_step()
    manager.close()
    return step, checkpoint.final_params(str(workdir))


def test_two_processes_equal_one_and_checkpoints_restore_across_process_counts(tmp_path,
                                                                                data_dir):
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    # Two steps on 1 process x 4 devices and on 2 processes x 2 devices, FSDP over all 4.
    finish([launch_local(1, one, data_dir, "train.steps=2", logs=tmp_path / "l1"),
            launch_local(2, two, data_dir, "train.steps=2", logs=tmp_path / "l2")],
           [tmp_path / "l1.out", tmp_path / "l2.out"])
    (step_one, params_one), (step_two, params_two) = params_at(one), params_at(two)
    assert step_one == step_two == 2
    chex.assert_trees_all_close(params_two, params_one, rtol=1e-5, atol=1e-6)
    metrics = (two / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # steps 1 and 2, written by process 0 only

    # Each continues on the other process count: 1 -> 2 under (faked) SLURM auto-detection,
    # 2 -> 1 with the local launcher. Both reach the same step-4 params.
    shutil.copytree(one, tmp_path / "one_then_two")
    shutil.copytree(two, tmp_path / "two_then_one")
    slurm = launch_fake_slurm(tmp_path / "one_then_two", data_dir, "train.steps=4",
                              logs=tmp_path / "s")
    back = launch_local(1, tmp_path / "two_then_one", data_dir, "train.steps=4",
                        logs=tmp_path / "l3")
    finish([*slurm, back], [tmp_path / "s_0.out", tmp_path / "s_1.out", tmp_path / "l3.out"])
    assert "at step 2" in (tmp_path / "s_0.out").read_text()
    assert "at step 2" in (tmp_path / "l3.out").read_text()
    (step_a, params_a), (step_b, params_b) = (params_at(tmp_path / "one_then_two"),
                                              params_at(tmp_path / "two_then_one"))
    assert step_a == step_b == 4
    chex.assert_trees_all_close(params_a, params_b, rtol=1e-5, atol=1e-6)


def test_a_dead_peer_ends_the_job_within_the_heartbeat_timeout(tmp_path, data_dir):
    port = local.free_port()
    args = run_args(tmp_path / "run", data_dir, FSDP, "train.steps=100000",
                    "train.log_every=1") + ["--heartbeat_timeout=10"]
    processes = [start(argv[1:], tmp_path / f"p{index}.out", {**environment(2), **env})
                 for index, (argv, env) in enumerate(local.commands(2, 4, port, args))]
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # training has begun
            assert time.monotonic() < deadline and processes[0].poll() is None, \
                (tmp_path / "p0.out").read_text()[-3000:]
            time.sleep(0.1)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = processes[0].wait(timeout=60)
        assert time.monotonic() - killed < 10 + 30
    finally:
        for p in processes:
            p.kill()
    assert code != 0
    assert "another task died" in (tmp_path / "p0.out").read_text()


def main_error(*args, env=None):
    """``launch.main`` run with ``args``: its exit status and its ``error:`` lines."""
    result = subprocess.run([sys.executable, "-m", "launch.main", *args], cwd=ROOT,
                            env=env or environment(1), capture_output=True, text=True,
                            timeout=120)
    return result.returncode, [l for l in result.stderr.splitlines() if l.startswith("error")]


def test_unreachable_coordinator_is_a_one_line_error(tmp_path, data_dir):
    port = local.free_port()  # nobody listens there
    code, errors = main_error(*run_args(tmp_path, data_dir), f"--coordinator=localhost:{port}",
                              "--num_processes=2", "--process_id=1", "--init_timeout=2")
    assert code == 2 and errors == [f"error: could not reach coordinator localhost:{port} within "
                                    "--init_timeout=2 s (Connection refused)"]


@pytest.mark.parametrize("argv, message", [
    (["--processes", "3", "--devices", "4", "--", "--config", "x.py", "--workdir", "w"],
     "error: --devices=4 does not split evenly over --processes=3"),
    (["--devices", "4", "--", "--config", "x.py"],
     "error: python -m launch.local: the following arguments are required: --processes"),
])
def test_local_launcher_bad_input_is_one_line(argv, message, capsys):
    try:
        code = local.main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    assert capsys.readouterr().err.strip() == message


def test_join_flags_without_a_cluster_are_one_line(tmp_path, data_dir):
    code, errors = main_error(*run_args(tmp_path, data_dir), "--distributed=on")
    assert code == 2 and errors == [
        "error: cannot join a multi-process run: --coordinator, --num_processes, --process_id "
        "not given and no SLURM or TPU environment to detect them from"]
