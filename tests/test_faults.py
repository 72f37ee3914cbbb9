"""Runs survive the faults long jobs meet: SIGKILL at any moment and SIGTERM (preemption)
resume bit-identically, a damaged newest checkpoint falls back to the previous one, and a
non-finite loss stops the run (or is skipped) without touching the last good checkpoint."""

import glob
import json
import os
import signal
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from research.train import checkpoint, loop
from tests.cli_runs import environment, finish, run_args, start
from tests.test_train import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def complete_steps(workdir) -> list[int]:
    """Steps orbax has finished (a step folder is renamed into place once complete)."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) \
        if os.path.isdir(folder) else []


def state_at(workdir, step=None):
    manager = checkpoint.make_manager(str(workdir))
    step = manager.latest_step() if step is None else step
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    manager.close()
    return step, jax.device_get(state)


STEPS = 30


def test_killed_and_preempted_runs_resume_bit_identically(tmp_path, data_dir):
    """SIGKILL a real run at three random points (it checkpoints every step and keeps one),
    then SIGTERM it; each rerun of the same command resumes, and the final state equals an
    uninterrupted run's bit for bit, optimizer state and step included."""
    def argv(workdir):
        return ["-m", "launch.main", *run_args(workdir, data_dir, f"train.steps={STEPS}",
                                               "checkpoint.every=1", "checkpoint.keep=1")]

    env = environment(1)
    straight = start(argv(tmp_path / "straight"), tmp_path / "straight.out", env)
    workdir = str(tmp_path / "interrupted")
    rng = np.random.default_rng()
    for attempt in range(4):
        log = tmp_path / f"attempt{attempt}.out"
        run = start(argv(workdir), log, env)
        target = (complete_steps(workdir) or [0])[-1] + int(rng.integers(2, 6))
        deadline = time.monotonic() + 240
        while not complete_steps(workdir) or complete_steps(workdir)[-1] < target:
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))  # anywhere in a step or a save
        last_complete = complete_steps(workdir)[-1]
        if attempt < 3:
            run.send_signal(signal.SIGKILL)
            run.wait()
            # The newest complete checkpoint survived: orbax deletes an old step only once a
            # newer one is complete.
            assert checkpoint.make_manager(workdir).latest_step() >= last_complete
        else:
            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=120) == 0, log.read_text()[-3000:]
            saved = int(log.read_text().split("preempted: saved step ")[1].split()[0])
            assert complete_steps(workdir)[-1] == saved >= last_complete
    finish([start(argv(workdir), tmp_path / "last.out", env)], [tmp_path / "last.out"])
    finish([straight], [tmp_path / "straight.out"])
    (step_a, a), (step_b, b) = state_at(tmp_path / "straight"), state_at(workdir)
    assert step_a == step_b == STEPS
    chex.assert_trees_all_equal(a, b)


def test_unreadable_newest_checkpoints_fall_back_to_the_last_readable(tmp_path, data_dir,
                                                                      capsys):
    """Step 6 loses half of a file, step 4 a whole one: both are set aside with a warning
    naming the step and the file, and the run resumes from step 2."""
    def config(steps):
        c = tiny_config(steps=steps, final_eval_splits=())
        c.data.data_dir = data_dir
        c.checkpoint.every = 2
        c.checkpoint.keep = 3
        return c

    loop.train(config(6), str(tmp_path))
    def biggest_file(step):
        return max(glob.glob(str(tmp_path / "checkpoints" / str(step) / "state" / "ocdbt.*" / "d"
                                 / "*")), key=os.path.getsize)
    with open(biggest_file(6), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    os.remove(biggest_file(4))
    capsys.readouterr()
    loop.train(config(8), str(tmp_path))
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert [w.split(" (")[0] for w in warnings] == ["warning: checkpoint step 6 is unreadable",
                                                    "warning: checkpoint step 4 is unreadable"]
    assert "/checkpoints/6/state/" in warnings[0] and "/checkpoints/4/state/" in warnings[1]
    assert f"resumed from {tmp_path} at step 2" in out
    # Set aside, not deleted; training went on from step 2 and saved steps 4 to 8 anew.
    assert {"4.unreadable", "6.unreadable"} <= set(os.listdir(tmp_path / "checkpoints"))
    assert complete_steps(str(tmp_path)) == [4, 6, 8]


def diverging_config(data_dir, **train):
    """A learning rate so large that the first update overflows the weights: step 1 is finite,
    every later loss is not."""
    config = tiny_config(final_eval_splits=(), **train)
    config.data.data_dir = data_dir
    config.optim.learning_rate = 1e30
    config.checkpoint.every = 1
    config.checkpoint.keep = 10
    return config


def test_a_nonfinite_loss_stops_the_run_and_names_the_step_and_batch(tmp_path, data_dir):
    with pytest.raises(loop.RunStopped) as info:
        loop.train(diverging_config(data_dir, steps=4), str(tmp_path))
    message = str(info.value)
    assert message.startswith("non-finite loss or gradients at step 2 (global batch 1 of the "
                              "'rotten_tomatoes/sentiment' training stream")
    assert "the last good checkpoint is step 1" in message and "\n" not in message
    assert complete_steps(str(tmp_path)) == [1]
    report = json.loads((tmp_path / "nonfinite_step_2.json").read_text())
    loader = loop.make_loader(diverging_config(data_dir), "train", training=True, batch_size=8)
    assert report["records"] == loader.sampler.batch_records(1) and len(report["records"]) == 8


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path, data_dir):
    results = loop.train(diverging_config(data_dir, steps=4, nonfinite="skip"), str(tmp_path))
    assert results["train/skipped_steps"] == 3
    (_, after_one), (step, final) = state_at(tmp_path, 1), state_at(tmp_path)
    assert step == 4 and int(final["step"]) == 4
    chex.assert_trees_all_equal(final["trainable"], after_one["trainable"])
    chex.assert_trees_all_equal(final["opt_state"], after_one["opt_state"])
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [l["train/skipped_steps"] for l in logged if "train/skipped_steps" in l][-1] == 3


def test_unknown_nonfinite_policy_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"config.train.nonfinite='ignore' is not one of "
                                         r"\('stop', 'skip'\)"):
        loop.train(tiny_config(nonfinite="ignore"), str(tmp_path))
