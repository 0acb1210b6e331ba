"""Helpers for the tests that run a job's main() in-process (tests/test_mnist_cli.py, tests/test_finetune_cli.py)."""

from pathlib import Path

import orbax.checkpoint as ocp


def run_main(main, argv, capsys):
    """(exit status, stdout, stderr) of `main(argv)`."""
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def latest_checkpoint(workdir):
    """(step, train state as a tree of arrays) of the run's latest checkpoint."""
    manager = ocp.CheckpointManager(Path(workdir, "checkpoints").absolute())
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return step, restored.state
