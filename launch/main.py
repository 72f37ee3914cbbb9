"""Train a config: ``python -m launch.main --config configs/NAME.py[:args] --workdir DIR``.

Any config key can be overridden with ``--config.key=value``. Mistakes in what the user gave
(an unknown key, a dataset or model that does not exist, a missing file, a checkpoint of another
model, a rule matching nothing) end with one line naming the problem, not a traceback.

The same command is every process of a multi-host run (``launch.distributed`` flags; the local,
TPU and SLURM launchers start it). Exit status: 0 when done or preempted (SIGTERM: the state is
saved, rerun to resume), 2 for bad input, 1 when the run stopped itself (a non-finite loss).
"""

from __future__ import annotations

import argparse
import json
import sys

from launch import distributed

USER_ERRORS = (ValueError, FileNotFoundError)


def print_figure(key: str, value, spec: str = ".4f") -> None:
    """One ``key=value`` line of a benchmark or experiment, floats formatted by ``spec``."""
    print(f"{key}={value:{spec}}" if isinstance(value, float) else f"{key}={value}", flush=True)


def run_command(fn, *args) -> int:
    """``fn(*args)`` as a command's exit status: 0, or 2 after one line for a user error."""
    try:
        fn(*args)
    except USER_ERRORS as err:
        print(f"error: {err.args[0] if err.args else repr(err)}", file=sys.stderr)
        return 2
    return 0


def trained(spec: str, workdir: str):
    """``(config, params)`` of the run of ``spec`` in ``workdir``, trained first unless done."""
    from research.train import checkpoint, loop
    from research.train import config as config_lib

    config = config_lib.load(spec)
    manager = checkpoint.make_manager(workdir)
    step = manager.latest_step()
    manager.close()
    if step != int(config.train.steps):
        print(f"--- training {spec} in {workdir}", flush=True)
        loop.train(config, workdir)
    return config, checkpoint.final_params(workdir)


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes (a missing or unknown flag, a bad value) are one line."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def parse_args(argv):
    parser = Parser(prog="python -m launch.main", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:args]")
    parser.add_argument("--workdir", required=True, help="checkpoints and metrics; reruns resume")
    distributed.add_flags(parser)
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides look like --config.key=value)")
        overrides.append(item[len("--config."):])
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from research.train import config as config_lib  # after argument parsing: --help stays fast
    from research.train import loop

    try:
        if distributed.wanted(args):
            distributed.initialize(args)
        config = config_lib.load(args.config, overrides)
        results = loop.train(config, args.workdir)
    except USER_ERRORS as err:
        message = err.args[0] if err.args else repr(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except loop.RunStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    import jax
    if jax.process_index() == 0:
        print(json.dumps(results))
        for key, value in results.items():
            print_figure(key, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
