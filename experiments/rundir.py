"""A run's directory: claiming it (a new run or `--resume`, one run at a time), its config, atomic writes, its
orbax checkpoints, and the signals that stop a run with a checkpoint saved.

Layout: run.lock (while a run holds the directory), config.json (the flat config, written once when the run
starts), metrics.jsonl, checkpoints/<step> (orbax, the last MAX_TO_KEEP), and the job's own files beside them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.cli import TrainingError, UsageError
from jax_googlenet import checkpoint, compilation_cache

MAX_TO_KEEP = 3  # checkpoints kept
LOCK = "run.lock"  # holds the pid of the run that has the directory, locked (flock) for that run's life


@contextlib.contextmanager
def claimed(workdir: str | None, resume: bool, default: str) -> Iterator[tuple[Path, dict | None]]:
    """(the run directory, its stored config on `resume`), the directory locked for this run while the block
    runs: --workdir, or a new runs/<default>-<time>-<pid>. A directory another run holds, a new run in one that
    holds a run (config.json) or checkpoints without a config, and --resume where there is no run are refused
    before anything is written; the directories this call created (runs/ too) are removed again where the run
    left them empty."""
    path = Path(workdir) if workdir else new_workdir(default)
    if resume and not (path / "config.json").is_file():
        raise UsageError(f"--resume: {path} holds no run (no config.json)")
    created = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
    lock = _lock(path) if jax.process_index() == 0 else None  # process 0 claims for the run
    try:
        if lock is not None:
            _remove_leftovers(path)
        if resume:
            yield path, read_config(path)
            return
        if (path / "config.json").exists():
            raise UsageError(f"--workdir {path} already holds a run; add --resume to continue it or choose "
                             f"another --workdir")
        if (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir()):
            raise UsageError(f"--workdir {path} holds checkpoints but no config.json; left as it is: choose "
                             f"another --workdir")
        yield path, None
    finally:
        if lock is not None:
            (path / LOCK).unlink(missing_ok=True)  # still held: a run that opened it meanwhile retries (_lock)
            os.close(lock)
        with contextlib.suppress(OSError):  # not empty: the run started
            for directory in created:
                directory.rmdir()


def _lock(path: Path) -> int:
    """An exclusive flock on path/LOCK, this pid written in it; another holder is one line naming its pid."""
    path.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"--workdir {path} is in use by another run (pid {holder}); wait for it to end or "
                             f"choose another --workdir") from None
        try:
            same = os.stat(path / LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed after we opened it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def read_config(path: Path) -> dict:
    """The stored config.json of the run in `path`: a JSON object, else one line."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--resume: {path / 'config.json'} is not JSON ({str(e).splitlines()[0]}); it was not "
                         f"written by this job") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--resume: {path / 'config.json'} holds a {type(cfg).__name__}, not a run's config (a "
                         f"JSON object)")
    return cfg


class Field(NamedTuple):
    """What a config field holds: `what` in words, `fits(value)` the check."""

    what: str
    fits: Callable[[Any], bool]


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


INTEGER = Field("an integer", lambda v: type(v) is int)
NATURAL = Field("an integer of at least 0", lambda v: type(v) is int and v >= 0)
POSITIVE = Field("an integer of at least 1", lambda v: type(v) is int and v >= 1)
NUMBER = Field("a finite number", _number)
FRACTION = Field("a number from 0 to 1", lambda v: _number(v) and 0 <= v <= 1)
FLAG = Field("true or false", lambda v: type(v) is bool)
TEXT = Field("a string", lambda v: type(v) is str)
OPTIONAL_TEXT = Field("a string or null", lambda v: v is None or type(v) is str)
OPTIONAL_FRACTION = Field("a number from 0 to 1 or null", lambda v: v is None or FRACTION.fits(v))
TEXTS = Field("a list of strings", lambda v: type(v) is list and all(type(x) is str for x in v))


def one_of(*choices: str) -> Field:
    """A field holding one of `choices`."""
    return Field("one of " + ", ".join(map(repr, choices)), lambda v: type(v) is str and v in choices)


def resume_config(stored: dict, given: dict, workdir: str | Path, *, free: tuple[str, ...] = (),
                  required: tuple[str, ...] = (), fields: dict[str, Field] | None = None) -> dict:
    """The stored config of a run to resume, with the given flags: each must agree with it, but those in `free`
    (e.g. where the data lives), which replace the stored values; the stored one has every `required` key, and
    each value of `fields` it holds fits its field."""
    where = Path(workdir) / "config.json"
    missing = [k for k in required if k not in stored]
    if missing:
        raise UsageError(f"--resume: {where} lacks {', '.join(missing)}; it was not written by this job")
    cfg = {**stored, **{k: v for k, v in given.items() if k in free}}
    for key, field in (fields or {}).items():
        if key in cfg and not field.fits(cfg[key]):
            raise UsageError(f"--resume: {where} has {key} {json.dumps(cfg[key])[:80]}, not {field.what}; it was "
                             f"not written by this job")
    for key, value in given.items():
        if key not in free and stored.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"--resume: the checkpoint in {workdir} was trained with {flag} {stored.get(key)}, "
                             f"not {value}")
    return cfg


def new_workdir(name: str) -> Path:
    """runs/<name>-<date>-<time>-<pid>, unique to the process; a multi-process run must name one on a
    filesystem every process shares."""
    if jax.process_count() > 1:
        raise UsageError("a multi-process run needs --workdir, on a filesystem every process shares")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def check_same_data(stored: dict, sizes: dict[str, int], workdir: Path, data: str) -> None:
    """On --resume, the data has the stored config's training and test sizes (which fix the steps per epoch
    and the learning-rate schedule); a config without them predates their keeping."""
    before = {k: stored[k] for k in sizes if k in stored}
    if before and before != {k: sizes[k] for k in before}:
        raise UsageError(f"--resume: the run in {workdir} was trained on {stored.get('train_size')} training and "
                         f"{stored.get('test_size')} test images; --data {data} has {sizes['train_size']} and "
                         f"{sizes['test_size']}")


def write_config(workdir: Path, cfg: dict) -> None:
    """A new run's config.json (its directory created)."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / "config.json", json.dumps(cfg, indent=1).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write a temporary file beside `path`, flushed to the disk, then rename it and flush the directory:
    readers never see a half-written file, nor after a crash. A failed write leaves `path` as it was and no
    temporary file (an OSError, `write_failed` makes it one line)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_failed(what: str, error: BaseException, workdir: Path, last_step: int | None,
                 report: str = "") -> TrainingError:
    """The one line (exit status 1) for a write that failed (a full disk, permission denied): what, why, and
    what is left to continue from; `report`: what the failing library printed, where the system's reason may
    be all that names it."""
    last = f"the last complete checkpoint is {last_step}" if last_step is not None else "no checkpoint is complete"
    return TrainingError(f"{what} in {workdir} failed ({_reason(error, report)}); {last}; make room there and "
                         f"continue with --resume --workdir {workdir}")


def _reason(error: BaseException, report: str) -> str:
    """The system's reason for a failed write (strerror): from the error or the errors it arose from, else from
    an "[Errno N] reason" in the error or `report`, else from tensorstore's status code, else the error's first
    line."""
    seen = error
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"\[Errno \d+\] ([^\]\n\"':]+)", f"{error}\n{report}")
    if found:
        return found.group(1).strip()
    status = str(error).split(":", 1)[0]
    return WRITE_STATUS.get(status) or (str(error).splitlines() or [type(error).__name__])[0][:200]


# tensorstore's status codes for failed writes, as absl maps the system's errors to them
WRITE_STATUS = {"OUT_OF_RANGE": os.strerror(errno.EFBIG), "RESOURCE_EXHAUSTED": os.strerror(errno.ENOSPC),
                "PERMISSION_DENIED": os.strerror(errno.EACCES)}


def _remove_leftovers(workdir: Path) -> None:
    """The temporary files of writes a run did not finish (a failure, a kill): write_atomic's and orbax's."""
    for tmp in workdir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    for tmp in (workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet_after_a_failed_save() -> None:
    """The run ends on a failed save: nothing of that save prints after, or ahead of, the one line that says what
    failed. Its asyncio tasks and coroutines, freed at exit, would each report the failure again; its threads still
    ending on orbax's closed event loop, and callbacks of its futures that concurrent.futures logs, would print
    tracebacks; what another thread writes straight to sys.stderr is dropped (only the main thread writes). Called
    while the save's stderr is still held, so that nothing slips out between the two."""
    logging.getLogger("asyncio").disabled = True
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    threading.excepthook = _ignored
    logging.getLogger("concurrent.futures").disabled = True
    if not isinstance(sys.stderr, _MainThreadOnly):
        sys.stderr = _MainThreadOnly(sys.stderr)


def _ignored(_: Any) -> None:
    """A thread's exception, not reported (`threading.excepthook` once a run has ended on a failed write)."""


class _MainThreadOnly(io.TextIOBase):
    """`stream` for what the main thread writes; what any other thread writes is dropped (sys.stderr once a run
    has ended on a failed write: a callback of the failed save, run on a thread of its own, reports its exception
    straight to sys.stderr, as Python does for an exception no caller can catch)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def _stderr_held(report: list[str]) -> Iterator[None]:
    """File descriptor 2 into a pipe while the block runs, written out after it, or appended to `report` if it
    raised: a failed orbax save reports itself from every thread it ran (hundreds of tracebacks), while its
    caller says what failed in one line. A pipe, not a file: a full disk cannot refuse it."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(read_end, chunks), daemon=True)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    completed = False
    try:
        yield
        completed = True
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader reaches its end
        os.close(saved)
        reader.join()
        text = b"".join(chunks).decode(errors="replace")
        if completed:
            sys.stderr.write(text)
            sys.stderr.flush()
        else:
            report.append(text)


def _drain(fd: int, chunks: list[bytes], keep: int = 1 << 20) -> None:
    """Read `fd` to its end, keeping its first `keep` bytes in `chunks`."""
    kept = 0
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            if kept < keep:
                chunks.append(chunk)
                kept += len(chunk)


class Checkpoints:
    """The run's orbax checkpoints in workdir/checkpoints, the last MAX_TO_KEEP kept: each holds the train
    state and, as JSON, the metrics history so far (so metrics.jsonl follows resumes) and, when saved by a
    signal within an epoch, that epoch's train metrics so far. orbax writes each atomically."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP))
        self.saved = self.manager.latest_step()

    def latest_step(self) -> int | None:
        """The last complete checkpoint's step."""
        return self.saved

    def save(self, step: int, state, history: list[dict], epoch_so_far: dict | None = None) -> None:
        """Save and wait for it; a failed write (a full disk, permission denied) is a one-line TrainingError,
        the last complete checkpoint left as it was."""
        meta = {"history": history} if epoch_so_far is None else {"history": history, "epoch_so_far": epoch_so_far}
        held = []
        try:
            # The collector paused: orbax allocates per array saved (~500 for a train state), and each
            # generation-2 collection on the way walks the job's ~2e5 live objects to free nothing (CPU per
            # save of the MNIST model's state 1.14 -> 1.03 s and 1.14 -> 0.93 s, alternated; NOTES.md).
            with _stderr_held(held), compilation_cache.gc_paused():
                try:
                    saved = ocp.args.StandardSave(checkpoint.host_copy(state))
                    self.manager.save(step, args=ocp.args.Composite(state=saved, meta=ocp.args.JsonSave(meta)),
                                      force=True)
                    self.manager.wait_until_finished()
                except Exception:
                    _quiet_after_a_failed_save()  # before the held output ends: the save's threads still report
                    with contextlib.suppress(Exception):
                        self.manager.close()
                    gc.collect()  # orbax's failed futures report themselves when freed: now, into the held output
                    raise
        except Exception as e:  # orbax and tensorstore raise OSError, ValueError or their own on a failed write
            raise write_failed(f"saving checkpoint {step}", e, self.workdir, self.saved, "".join(held)) from None
        self.saved = step

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
    saves and exits (`exit_stopped`). A second signal exits at once with 128 + its number, leaving the last
    complete checkpoint (a save it cut short is removed at the next start)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None:
            print(f"stopped by a second signal {signum}: exiting at once; the last complete checkpoint stays",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum

    def agreed(self) -> int | None:
        """The signal if any process of the run got one, else None: an any over the processes (every process
        calls it at the same step), so that they all stop there and save together."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        return int(multihost_utils.process_allgather(np.int32(self.signum or 0)).max()) or None

    def __enter__(self):
        self.previous = [signal.signal(s, self) for s in self.SIGNALS]
        return self

    def __exit__(self, *exc):
        for s, handler in zip(self.SIGNALS, self.previous):
            signal.signal(s, handler)


def started_without_stop_signals(batches: Iterable) -> Iterator:
    """`batches`, its iterator made and its first item taken with SIGINT and SIGTERM ignored: grain's worker
    processes start then and keep ignoring them (a spawned process inherits ignored signals, not handlers nor
    the signal mask), so a Ctrl-C to the process group stops this process alone, which saves and stops them.
    The signals are blocked meanwhile, so one that comes then arrives here once the handlers are back."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, StopFlag.SIGNALS)
    handlers = [signal.signal(s, signal.SIG_IGN) for s in StopFlag.SIGNALS]
    try:
        iterator = iter(batches)
        first = next(iterator, _END)
    finally:
        for s, handler in zip(StopFlag.SIGNALS, handlers):
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if first is not _END:
        yield first
        yield from iterator


_END = object()


def exit_stopped(step: int, workdir: Path, signum: int, *, saved: bool = True) -> None:
    """Exit with 128 + `signum` once checkpoint `step` is saved (or with nothing to save, before the first
    step), saying how to continue."""
    if saved:
        print(f"stopped by signal {signum} at step {step}: saved checkpoint {step} in {workdir}; "
              f"continue with --resume --workdir {workdir}", file=sys.stderr, flush=True)
    else:
        print(f"stopped by signal {signum} before the first step at {step}: nothing to save in {workdir}",
              file=sys.stderr, flush=True)
    sys.exit(128 + signum)
