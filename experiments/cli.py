"""The jobs' command line: one argparse `Parser` whose errors are one line, the two errors a job exits with
(`UsageError`, exit status 2; `TrainingError`, exit status 1), `run_cli` (a job's main) and the flags every
training job shares (`add_run_flags`, `check_run_flags`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


class UsageError(Exception):
    """Bad input (exit status 2); the message is the one line the user sees."""


class TrainingError(Exception):
    """The run went wrong, e.g. a NaN loss (exit status 1); one line."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageError: one line, not argparse's usage block."""

    def error(self, message):
        raise UsageError(message)


def run_cli(work: Callable[[], str], *, bad_input: tuple[type[Exception], ...] = ()) -> int:
    """A job's main: `work()`, then its last line (the result) on stdout; exit status 0. Bad input (UsageError
    and the job's `bad_input` errors) is one line on stderr and status 2, a failed run (TrainingError) status 1."""
    try:
        line = work()
    except (UsageError, *bad_input) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(line, flush=True)
    return 0


def exit_process(status: int) -> None:
    """End a job's process with `status`. A failed run (status 1) ends without joining the libraries' threads:
    after a checkpoint's directory could not be created (permission denied), orbax's save threads wait 300 s for
    it and then print their timeouts, after the run's one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status == 1:
        os._exit(status)
    sys.exit(status)


def add_run_flags(p: argparse.ArgumentParser, name: str) -> None:
    """The flags of every training job: where the run lives, its devices and hosts, dtype, compilation cache;
    `name` gives the default run directory, runs/<name>-<time>-<pid>."""
    p.add_argument("--workdir", default=None, help=f"output directory, held by one run at a time (default: "
                   f"runs/{name}-<time>-<pid>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --workdir from its latest checkpoint (flags default to its config)")
    p.add_argument("--devices", type=int, default=None,
                   help="data-parallel over the first N devices (default: all); the mesh is printed at start")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-host run without SLURM/Open MPI: process 0's address, with --num-processes and "
                   "--process-id (under srun or mpirun the processes find each other)")
    p.add_argument("--num-processes", type=int, default=None, help="processes in a multi-host run")
    p.add_argument("--process-id", type=int, default=None, help="this process's index in a multi-host run")
    p.add_argument("--bn-recalibrate", type=int, default=None, metavar="N",
                   help="before each evaluation and model/, recompute BatchNorm's statistics over up to N training "
                   "images under the evaluation transform, for what is evaluated and saved (the checkpoints keep "
                   "the running ones; default: one epoch's images, at most 2,000; 0: off; off with "
                   "--freeze-backbone and --evaluate unless given)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="computation dtype; parameters and optimizer state stay float32")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent XLA compilation cache (~/.cache/jax_googlenet/xla)")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc and JAX's asynchronous CPU dispatch as they are (default: freed "
                        "blocks are kept for the next step, CPU steps run on the calling thread)")


def check_run_flags(args, positive: tuple[str, ...]) -> None:
    """The flags named in `positive` (and --devices) are at least 1; --resume names its --workdir."""
    for name in (*positive, "devices"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.bn_recalibrate is not None and args.bn_recalibrate < 0:
        raise UsageError(f"--bn-recalibrate must be at least 0 (0: off), got {args.bn_recalibrate}")
    if args.resume and args.workdir is None:
        raise UsageError("--resume needs the --workdir of the run to continue")
