"""A run's directory: opening it (a new run or `--resume`), its config, atomic writes, its orbax checkpoints,
and the signals that stop a run with a checkpoint saved.

Layout: config.json (the flat config, written once when the run starts), metrics.jsonl, checkpoints/<step>
(orbax, the last MAX_TO_KEEP), and the job's own files beside them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from experiments.cli import UsageError

MAX_TO_KEEP = 3  # checkpoints kept


def open_workdir(workdir: str | None, resume: bool) -> tuple[Path | None, dict | None]:
    """(the run directory, its stored config): the config on `resume`, which needs one; a new run refuses a
    directory that already holds a run."""
    path = Path(workdir) if workdir else None
    if resume:
        config = path / "config.json"
        if not config.is_file():
            raise UsageError(f"--resume: {path} holds no run (no config.json)")
        return path, json.loads(config.read_text())
    if path is not None and (path / "config.json").exists():
        raise UsageError(f"--workdir {path} already holds a run; add --resume to continue it or choose "
                         f"another --workdir")
    return path, None


def resume_config(stored: dict, given: dict, workdir: str | Path, *, free: tuple[str, ...] = ()) -> dict:
    """The stored config of a run to resume, with the given flags: each must agree with it, but those in `free`
    (e.g. where the data lives), which replace the stored values."""
    for key, value in given.items():
        if key not in free and stored.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"--resume: the checkpoint in {workdir} was trained with {flag} {stored.get(key)}, "
                             f"not {value}")
    return {**stored, **{k: v for k, v in given.items() if k in free}}


def new_workdir(name: str) -> Path:
    """runs/<name>-<date>-<time>; a multi-process run must name one on a filesystem every process shares."""
    if jax.process_count() > 1:
        raise UsageError("a multi-process run needs --workdir, on a filesystem every process shares")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_config(workdir: Path, cfg: dict) -> None:
    """A new run's config.json (its directory created)."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / "config.json", json.dumps(cfg, indent=1).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write a temporary file beside `path`, then rename it: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Checkpoints:
    """The run's orbax checkpoints in workdir/checkpoints, the last MAX_TO_KEEP kept: each holds the train
    state and, as JSON, the metrics history so far (so metrics.jsonl follows resumes) and, when saved by a
    signal within an epoch, that epoch's train metrics so far. orbax writes each atomically."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, history: list[dict], epoch_so_far: dict | None = None) -> None:
        meta = {"history": history} if epoch_so_far is None else {"history": history, "epoch_so_far": epoch_so_far}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, state) -> tuple[Any, dict, int]:
        """(state, meta, step) of the latest checkpoint, `state` giving the tree, shapes and shardings."""
        step = self.manager.latest_step()
        if step is None:
            raise UsageError(f"--resume: {self.workdir} holds no checkpoint")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:  # a tree or shape that config.json did not announce
            raise UsageError(f"--resume: checkpoint {step} in {self.workdir} does not fit this model: "
                             f"{str(e).splitlines()[0]}") from None
        return restored.state, restored.meta, step

    def close(self) -> None:
        self.manager.close()


class StopFlag:
    """Set by SIGINT/SIGTERM while active: the loop finishes its step (or its epoch, at the epoch's last step),
    saves and exits (`exit_stopped`)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        self.previous = [signal.signal(s, self) for s in self.SIGNALS]
        return self

    def __exit__(self, *exc):
        for s, handler in zip(self.SIGNALS, self.previous):
            signal.signal(s, handler)


def exit_stopped(step: int, workdir: Path, signum: int) -> None:
    """Exit with 128 + `signum` once checkpoint `step` is saved, saying how to continue."""
    print(f"stopped by signal {signum} at step {step}: saved checkpoint {step} in {workdir}; "
          f"continue with --resume --workdir {workdir}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)
