"""The training loop every job here shares, whatever its data: run directory, checkpoints, signals, epochs.

A job (experiments/mnist.py, experiments/finetune.py) sets up its config, data, model and steps, gathers them in a
`Job` and calls `restore_or_start`; then `train_and_evaluate(job)` runs the named steps, as flax's examples do:

- `restore_or_start`: continue from the latest checkpoint (`--resume`) or write config.json to a new run;
- `train_epoch`: one epoch of train steps, the device a step ahead of the host, a NaN loss stopping the run and
  SIGINT/SIGTERM saving a checkpoint and exiting with 128 + the signal number (after the epoch's results when
  the signal comes at its end);
- `evaluate`: the test metrics over every test example once (top-5 and a confusion matrix too when the eval
  step counts them);
- `write_results`: the epoch's checkpoint, metrics.jsonl, curves.png, the job's own files (`write_details`) and
  one printed line;
- `finish`: the last line and the final test accuracy.

Shared set-up pieces: `resume_config` (a stored config and the flags given with --resume), `warm_start` (from
pretrained weights), `make_mesh`, `jit_steps`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import progress
from jax_googlenet import compilation_cache, distributed, host_memory, ops

MAX_TO_KEEP = 3  # checkpoints kept


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


def add_run_flags(p: argparse.ArgumentParser, name: str) -> None:
    """The flags of every training job: where the run lives, its devices and hosts, dtype, compilation cache;
    `name` gives the default run directory, runs/<name>-<time>."""
    p.add_argument("--workdir", default=None, help=f"output directory (default: runs/{name}-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --workdir from its latest checkpoint (flags default to its config)")
    p.add_argument("--devices", type=int, default=None,
                   help="data-parallel over the first N devices (default: all); the mesh is printed at start")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-host run without SLURM/Open MPI: process 0's address, with --num-processes and "
                   "--process-id (under srun or mpirun the processes find each other)")
    p.add_argument("--num-processes", type=int, default=None, help="processes in a multi-host run")
    p.add_argument("--process-id", type=int, default=None, help="this process's index in a multi-host run")
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
    if args.resume and args.workdir is None:
        raise UsageError("--resume needs the --workdir of the run to continue")


# ----------------------------------------------------------------------------------------------- run directory


def start_process(coordinator: str | None, num_processes: int | None, process_id: int | None, *,
                  compile_cache: bool, system_malloc: bool) -> None:
    """Join a multi-process run if there is one, keep freed host memory for reuse unless `system_malloc`
    (`host_memory`, its line printed) and turn the persistent compilation cache on."""
    distributed.initialize(coordinator, num_processes, process_id)
    print(host_memory.configure(system_malloc), flush=True)
    if compile_cache:
        compilation_cache.enable()


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


def write_atomic(path: Path, data: bytes) -> None:
    """Write a temporary file beside `path`, then rename it: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def make_mesh(devices: int | None, batch_size: int):
    """The data-parallel mesh over the first `devices` devices (default all), printed; the global batch must
    divide over it."""
    try:
        mesh = distributed.make_mesh(devices)
        distributed.check_batch_size(batch_size, mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(distributed.describe(mesh), flush=True)
    return mesh


# ----------------------------------------------------------------------------------------------- checkpoints


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


# ----------------------------------------------------------------------------------------------- the job


@dataclasses.dataclass
class Job:
    """What a job's set-up hands the loop. `train_step(state, batch) -> (state, {"loss", "accuracy"})` and
    `eval_step(state, batch) -> {"loss", "correct", "count", ...}` (sums; see `evaluate_batches` for more) are
    jitted (`jit_steps`); batches are this process's rows, sharded over `mesh` here."""

    cfg: dict  # the flat config written to config.json; the loop reads "epochs" and "batch_size"
    workdir: Path
    mesh: Any
    state: Any  # the train state, replicated over the mesh
    steps_per_epoch: int
    train_step: Callable
    eval_step: Callable
    train_batches: Callable[[int, int], Iterable[dict]]  # (epoch, first step) -> that epoch's batches from there
    eval_batches: Callable[[], Iterable[dict]]  # every test example once, the padding masked
    checkpoints: Checkpoints | None = None
    history: list[dict] = dataclasses.field(default_factory=list)  # one record per finished epoch
    epoch_so_far: dict | None = None  # the unfinished epoch's train metrics, restored with a signal's checkpoint
    step: int = 0
    lead: bool = True  # process 0: writes config.json, metrics.jsonl and the plot, shows progress
    # (workdir, test metrics, the evaluation's array sums) -> more files, on the lead process after each epoch
    write_details: Callable[[Path, dict, dict], None] | None = None
    details: dict = dataclasses.field(default_factory=dict)  # the latest evaluation's array sums


def warm_start(path: str, model, state, *, fresh: tuple[tuple[str, ...], ...] = ()):
    """`state` with its parameters and BatchNorm statistics filled from pretrained GoogLeNet weights (a .pth or
    a checkpoint directory) wherever shapes allow, but for the `fresh` modules (`convert.load_pretrained`, which
    prints what it copied)."""
    try:
        from convert import load_pretrained
    except ImportError as e:
        raise UsageError(f"--init needs convert.load_pretrained and torch ({e})") from None
    variables = load_pretrained(path, model, {"params": state.params, "batch_stats": state.batch_stats},
                                fresh=fresh)
    print(f"initialised from {path}", flush=True)
    return state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}))


def jit_steps(train_fn: Callable, eval_fn: Callable, mesh, image_side: int,
              dtype: str) -> tuple[Callable, Callable]:
    """`train_fn` and `eval_fn` jitted for `mesh` and `dtype` images `image_side` wide (`ops.compiler_options`):
    outputs replicated, the train state donated."""
    replicated = distributed.replicated(mesh)
    # without_gc: the first calls trace, lower and compile without Python's collector walking the trace
    return (compilation_cache.without_gc(jax.jit(train_fn, donate_argnums=0, out_shardings=replicated,
                                                 compiler_options=ops.compiler_options(image_side, dtype))),
            jit_eval_step(eval_fn, mesh, image_side, dtype))


def jit_eval_step(eval_fn: Callable, mesh, image_side: int, dtype: str) -> Callable:
    """`eval_fn` jitted for `mesh` and `dtype` images `image_side` wide, its outputs replicated."""
    return compilation_cache.without_gc(jax.jit(eval_fn, out_shardings=distributed.replicated(mesh),
                                                compiler_options=ops.compiler_options(image_side, dtype)))


def train_and_evaluate(job: Job) -> float:
    """Train from where the run stands to its last epoch, evaluating and writing results after each; returns the
    final test accuracy."""
    with StopFlag() as stop:
        for epoch in range(job.step // job.steps_per_epoch, job.cfg["epochs"]):
            trained = train_epoch(job, epoch, stop)
            write_results(job, epoch, trained, evaluate(job))
            if stop.signum is not None and epoch + 1 < job.cfg["epochs"]:  # saved with the results
                exit_stopped(job, stop.signum)
        return finish(job)


def restore_or_start(job: Job, resume: bool) -> None:
    """On `resume` the latest checkpoint's state, history and step; else a new run directory with config.json."""
    job.checkpoints = Checkpoints(job.workdir)
    if resume:
        job.state, meta, step = job.checkpoints.restore(job.state)
        job.history, job.epoch_so_far = meta["history"], meta.get("epoch_so_far")
        spe = job.steps_per_epoch
        print(f"resumed from step {step} (epoch {step // spe + 1}, step {step % spe} of {spe})", flush=True)
    elif job.lead:
        job.workdir.mkdir(parents=True, exist_ok=True)
        write_atomic(job.workdir / "config.json", json.dumps(job.cfg, indent=1).encode())
    job.step = int(job.state.step)


class StopFlag:
    """Set by SIGINT/SIGTERM while active: the loop finishes its step (or its epoch, at the epoch's last step),
    saves and exits."""

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


class Trained(NamedTuple):
    """One epoch's training: mean train loss and accuracy, seconds training, images trained on (a resumed
    epoch's part before the interruption included)."""

    metrics: dict[str, float]
    seconds: float
    images: int


def train_epoch(job: Job, epoch: int, stop: StopFlag) -> Trained:
    """Train steps from the job's step to the end of `epoch`. Each step's metrics are read after the next step
    is dispatched, so an accelerator runs a step ahead of the host (the CPU runs each step on the calling thread,
    `jax_googlenet.host_memory`, unless --system-malloc). A non-finite loss raises TrainingError without
    saving; a signal before the epoch's last step saves a checkpoint, with the epoch's metrics so far, and exits."""
    batch_size = job.cfg["batch_size"]
    skip = job.step - epoch * job.steps_per_epoch
    batches = job.train_batches(epoch, skip)
    so_far = job.epoch_so_far or {"losses": [], "accuracies": [], "seconds": 0.0}
    job.epoch_so_far = None
    losses, accuracies = list(so_far["losses"]), list(so_far["accuracies"])
    with progress.bar(job.steps_per_epoch * batch_size, initial=skip * batch_size,
                      desc=f"epoch {epoch + 1}/{job.cfg['epochs']}", disable=not job.lead) as shown:
        pending, t0 = None, time.time()

        def collect(at_step, metrics):
            loss, accuracy = (float(v) for v in jax.device_get((metrics["loss"], metrics["accuracy"])))
            if not math.isfinite(loss):
                good = job.checkpoints.latest_step()
                raise TrainingError(f"the loss became {loss} at step {at_step}; stopped without saving. Last "
                                    f"good checkpoint: {good if good is not None else 'none'} in {job.workdir}")
            losses.append(loss)
            accuracies.append(accuracy)
            shown.update(batch_size, loss=loss)

        for batch in batches:
            job.state, metrics = job.train_step(job.state, distributed.shard_batch(batch, job.mesh))
            job.step += 1
            if pending is not None:
                collect(*pending)
            pending = (job.step, metrics)
            if stop.signum is not None:
                break
        if pending is not None:
            collect(*pending)
    seconds = so_far["seconds"] + time.time() - t0
    if stop.signum is not None and job.step < (epoch + 1) * job.steps_per_epoch:
        job.checkpoints.save(job.step, job.state, job.history,
                             epoch_so_far={"losses": losses, "accuracies": accuracies, "seconds": seconds})
        exit_stopped(job, stop.signum)
    return Trained({"train_loss": float(np.mean(losses)), "train_accuracy": float(np.mean(accuracies))},
                   seconds, len(losses) * batch_size)


def exit_stopped(job: Job, signum: int) -> None:
    """Exit with 128 + `signum` once the state reached is saved, saying how to continue."""
    print(f"stopped by signal {signum} at step {job.step}: saved checkpoint {job.step} in {job.workdir}; "
          f"continue with --resume --workdir {job.workdir}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def evaluate(job: Job) -> dict:
    """The test metrics over every test example (see `evaluate_batches`); array sums kept in `job.details`."""
    metrics, job.details = evaluate_batches(job.eval_step, job.state, job.eval_batches(), job.mesh)
    return metrics


def evaluate_batches(eval_step: Callable, state, batches: Iterable[dict], mesh) -> tuple[dict, dict]:
    """(metrics, array sums) of `eval_step` over `batches`: test loss, accuracy and count, and the top-5
    accuracy when the step counts "correct_top5". Every batch is dispatched before one fetch; scalar sums add
    up on the host in float64, array sums (a confusion matrix) on the device."""
    scalars, arrays = [], {}
    for batch in batches:
        out = eval_step(state, distributed.shard_batch(batch, mesh))
        scalars.append({k: v for k, v in out.items() if v.ndim == 0})
        for k, v in out.items():
            if v.ndim:
                arrays[k] = arrays[k] + v if k in arrays else v
    scalars, arrays = jax.device_get((scalars, arrays))
    sums = {k: sum(float(out[k]) for out in scalars) for k in scalars[0]}
    metrics = {"test_loss": sums["loss"] / sums["count"], "test_accuracy": sums["correct"] / sums["count"],
               "test_count": int(sums["count"])}
    if "correct_top5" in sums:
        metrics["test_top5_accuracy"] = sums["correct_top5"] / sums["count"]
    return metrics, arrays


def write_results(job: Job, epoch: int, trained: Trained, tested: dict) -> None:
    """The epoch's record into the history and a checkpoint; on the lead process metrics.jsonl, curves.png and
    one line."""
    seconds = trained.seconds
    job.history.append({"epoch": epoch + 1, "step": job.step, **trained.metrics, **tested,
                        "epoch_seconds": round(seconds, 2),
                        "images_per_second": round(trained.images / seconds, 1)})
    job.checkpoints.save(job.step, job.state, job.history)
    if job.lead:
        write_atomic(job.workdir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in job.history).encode())
        plot(job.history, job.workdir / "curves.png")
        if job.write_details is not None:
            job.write_details(job.workdir, tested, job.details)
        h = job.history[-1]
        top5 = f" test_top5_accuracy={h['test_top5_accuracy']:.4f}" if "test_top5_accuracy" in h else ""
        print(f"epoch {h['epoch']}: train_loss={h['train_loss']:.4f} test_loss={h['test_loss']:.4f} "
              f"test_accuracy={h['test_accuracy']:.4f}{top5} ({h['test_count']} images, {seconds:.1f} s)",
              flush=True)


def finish(job: Job) -> float:
    """Close the checkpoints, say what the run wrote; the final test accuracy."""
    job.checkpoints.close()
    print(f"wrote {job.workdir}: config.json, metrics.jsonl, curves.png, checkpoints/{job.step}", flush=True)
    return job.history[-1]["test_accuracy"]


def plot(history: list[dict], path: Path) -> None:
    """Loss and accuracy against epochs, train and test, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax2.plot(epochs, [h["test_accuracy"] for h in history], "o-", label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    write_png(fig, path)


def write_png(fig, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically (`write_atomic`); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
