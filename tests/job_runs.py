"""Helpers for the tests that run a job's main() in-process (tests/test_mnist_cli.py, tests/test_finetune_cli.py)."""

import contextlib
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import orbax.checkpoint as ocp

from jax_googlenet import data
from jax_googlenet.ops import plan


# For job runs whose programs are compiled for that run alone, where compiling is nearly all of the time: XLA:CPU's
# elemental loop emitters (`ops.plan.ELEMENTAL_EMITTERS`, as XLA_FLAGS) instead of its fusion emitters, with most
# optimisations off (`JAX_DISABLE_MOST_OPTIMIZATIONS`): the 16-pixel train step's compile 6.0 -> 3.6 s (it then
# runs 91 against 58 ms a step); the two-process and permission-denied MNIST runs and the 2-device one 178 -> 132
# CPU seconds together, measured.
ELEMENTAL_EMITTERS = " ".join(f"--{k}={str(v).lower()}" for k, v in plan.ELEMENTAL_EMITTERS.items())
# The same as XLA_FLAGS alone, LLVM's level 0 instead of JAX_DISABLE_MOST_OPTIMIZATIONS, for processes that are not
# jobs (tests/test_distributed.py's workers, tests/test_benchmark.py's tiny run): LLVM's level 0 halved a worker's
# train-step compile (50 -> 24 CPU seconds); with the emitters the tiny benchmark run took 44 -> 32 s alone.
UNOPTIMISED = f"--xla_backend_optimization_level=0 {ELEMENTAL_EMITTERS}"


def run_main(main, argv, capsys):
    """(exit status, stdout, stderr) of `main(argv)`."""
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def write_sample_idx(directory, train: int = 48, test: int = 20) -> str:
    """Real digits from the shipped sample, `train` and `test` of them spread over every class, as the four
    gzipped IDX files in `directory`; the `--data` spec that reads them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sample = data.load_sample()
    for split, n in (("train", train), ("test", test)):
        source = getattr(sample, split)
        picks = np.linspace(0, len(source) - 1, n).astype(int)
        image_name, label_name = data.IDX_FILES[split]
        data.write_idx(directory / f"{image_name}.gz", source.images[picks, ..., 0])
        data.write_idx(directory / f"{label_name}.gz", source.labels[picks].astype(np.uint8))
    return f"idx:{directory}"


def mnist_signalling_itself(signal_name: str, *, at_batch: int | None = 2,
                            process_id: int | None = None) -> str:
    """Python source for `python -c`: the MNIST job sending itself `signal_name` (e.g. "SIGTERM") in its first
    epoch, in process `process_id` alone when given (read from --process-id). At batch `at_batch` (drawn 0, 1,
    ...): the job finishes that step, saves it and exits 128 + the signal before any evaluation, so nothing is
    compiled for the recalibration or the eval step. `at_batch=None`: once the epoch's batches are drawn, so the
    epoch is evaluated, written and saved (checkpoint and metrics.jsonl's first record) before the exit."""
    return f"""
import os, signal, sys
from experiments import cli, mnist
from jax_googlenet import data
train_batches = data.train_batches
argv = sys.argv[1:]
PROCESS_ID, AT_BATCH = {process_id!r}, {at_batch!r}
signalled = PROCESS_ID is None or int(argv[argv.index("--process-id") + 1]) == PROCESS_ID
def signal_in_the_first_epoch(source, *, epoch, **kwargs):
    for i, batch in enumerate(train_batches(source, epoch=epoch, **kwargs)):
        if signalled and epoch == 0 and i == AT_BATCH:
            os.kill(os.getpid(), signal.{signal_name})
        yield batch
    if signalled and epoch == 0 and AT_BATCH is None:
        os.kill(os.getpid(), signal.{signal_name})
data.train_batches = signal_in_the_first_epoch
cli.exit_process(mnist.main(argv))  # as `python -m experiments.mnist` ends
"""


def stopped_at_line(proc: subprocess.Popen, prefix: str, stop: Callable[[], None]) -> tuple[str, str]:
    """(stdout, stderr) of a job started with both as text pipes, `stop()` called (a signal) as soon as a line of
    its stderr starts with `prefix` (a progress line: stderr is a pipe, so progress comes as plain lines)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(prefix):
            break
    with contextlib.suppress(ProcessLookupError):  # ended early: its output says why
        stop()
    out, err = proc.communicate(timeout=600)
    return out, "".join(seen) + err


def latest_checkpoint(workdir):
    """(step, train state as a tree of arrays) of the run's latest checkpoint."""
    manager = ocp.CheckpointManager(Path(workdir, "checkpoints").absolute())
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return step, restored.state


def explained_flags(help_text):
    """{flag: its explanation} from argparse's --help: every long flag of the options section, with the text
    that follows its invocation (on its line after two spaces, or on the lines below it)."""
    options = help_text.split("\noptions:\n", 1)[1]
    explained, flag = {}, None
    for line in options.splitlines():
        if line.startswith("  -"):  # an option's first line: its invocation, then maybe its explanation
            invocation, _, explanation = line.strip().partition("  ")
            flag = next(t.rstrip(",") for t in invocation.split() if t.startswith("--"))
            explained[flag] = explanation.strip()
        elif flag is not None and line.startswith("   ") and line.strip():
            explained[flag] = f"{explained[flag]} {line.strip()}".strip()
        else:
            flag = None  # the epilog
    return explained
