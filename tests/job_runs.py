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
