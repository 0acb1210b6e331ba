"""The epoch loop every job here shares, whatever its data.

A job (experiments/mnist.py, experiments/finetune.py) sets up its config, data, model and jitted steps, gathers
them in a `Job` and calls `restore_or_start`; then `train_and_evaluate(job)` runs the named steps, as flax's
examples do:

- `restore_or_start`: continue from the latest checkpoint (`--resume`) or write config.json to a new run;
- `train_epoch`: one epoch of train steps, the device a step ahead of the host, a NaN loss stopping the run and
  SIGINT/SIGTERM saving a checkpoint and exiting with 128 + the signal number (after the epoch's results when
  the signal comes at its end);
- `evaluate`: the test metrics over every test example once (top-5 and a confusion matrix too when the eval
  step counts them);
- `write_results`: the epoch's checkpoint, metrics.jsonl, curves.png, the job's own files (`write_details`) and
  one printed line;
- `finish`: the last line and the final test accuracy.

The job enters `rundir.StopFlag` as soon as it has claimed its directory, and the data's worker processes leave
SIGINT/SIGTERM to it (`rundir.started_without_stop_signals`), so a signal anywhere in the run is a checkpoint
and exit status 128 + its number.

The run directory, checkpoints and signals are `experiments.rundir`'s, the figures `experiments.plots`'.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import jax
import numpy as np

from experiments import plots, progress
from experiments.cli import TrainingError
from experiments.rundir import (Checkpoints, StopFlag, exit_stopped, started_without_stop_signals, write_atomic,
                                write_config, write_failed)
from jax_googlenet import compilation_cache, distributed
from jax_googlenet.checkpoint import save_model


@dataclasses.dataclass
class Job:
    """What a job's set-up hands the loop. `train_step(state, batch) -> (state, {"loss", "accuracy"})` and
    `eval_step(evaluated, batch) -> {"loss", "correct", "count", ...}` (sums; see `evaluate_batches` for more;
    `evaluated`: the state, or `inference(state)`) are jitted (`jax_googlenet.train.jit_train_step`); batches
    are this process's rows, sharded over `mesh` here."""

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
    # state -> what eval_step takes in its place (experiments.inference: recalibrated, folded); None: the state
    inference: Callable[[Any], Any] | None = None


def train_and_evaluate(job: Job, stop: StopFlag) -> float:
    """Train from where the run stands to its last epoch, evaluating and writing results after each; returns the
    final test accuracy. `stop`, active since the job started, ends the run at a step with a checkpoint (before
    the first step, with nothing to save)."""
    signum = stop.agreed()
    if signum is not None:
        exit_stopped(job.step, job.workdir, signum, saved=False)
    for epoch in range(job.step // job.steps_per_epoch, job.cfg["epochs"]):
        trained = train_epoch(job, epoch, stop)
        write_results(job, epoch, trained, evaluate(job))
        signum = stop.agreed()
        if signum is not None and epoch + 1 < job.cfg["epochs"]:  # saved with the results
            exit_stopped(job.step, job.workdir, signum)
    return finish(job)


def restore_or_start(job: Job, resume: bool) -> None:
    """On `resume` the latest checkpoint's state, history and step (none yet: the run stopped or failed before its
    first save, and starts at step 0 with its config.json); else a new run directory with config.json."""
    job.checkpoints = Checkpoints(job.workdir)
    if resume and job.checkpoints.latest_step() is None:
        print(f"--resume: {job.workdir} holds no checkpoint yet: the run starts at step 0 with its config.json",
              flush=True)
    elif resume:
        job.state, meta, step = job.checkpoints.restore(job.state)
        job.history, job.epoch_so_far = meta["history"], meta.get("epoch_so_far")
        spe = job.steps_per_epoch
        print(f"resumed from step {step} (epoch {step // spe + 1}, step {step % spe} of {spe})", flush=True)
    elif job.lead:
        write_config(job.workdir, job.cfg)
    job.step = int(job.state.step)


class Trained(NamedTuple):
    """One epoch's training: mean train loss and accuracy, seconds training, images trained on (a resumed
    epoch's part before the interruption included)."""

    metrics: dict[str, float]
    seconds: float
    images: int


def train_epoch(job: Job, epoch: int, stop: StopFlag) -> Trained:
    """Train steps from the job's step to the end of `epoch`. A step's metrics are read once they are ready:
    at once where the step ran on the calling thread (the CPU, `jax_googlenet.host_memory`, unless
    --system-malloc), else after the next step is dispatched, so an accelerator runs a step ahead of the host;
    either way each progress line times the steps it counts. A non-finite loss raises TrainingError without
    saving; a signal before the epoch's last step (agreed by every process; the data failing after it too)
    saves a checkpoint, with the epoch's metrics so far, and exits."""
    batch_size = job.cfg["batch_size"]
    skip = job.step - epoch * job.steps_per_epoch
    batches = started_without_stop_signals(job.train_batches(epoch, skip))
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

        stopped = None
        while stopped is None:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception:
                if stop.signum is None:
                    raise
                stopped = stop.agreed()  # the data stopped with the run (a worker got the signal too)
                break
            with compilation_cache.gc_paused():  # the first call traces and compiles: no collector walks it
                job.state, metrics = job.train_step(job.state, distributed.shard_batch(batch, job.mesh))
            job.step += 1
            if pending is not None:
                collect(*pending)
                pending = None
            if all(leaf.is_ready() for leaf in jax.tree.leaves(metrics)):
                collect(job.step, metrics)
            else:
                pending = (job.step, metrics)
            stopped = stop.agreed()
        if pending is not None:
            collect(*pending)
    seconds = so_far["seconds"] + time.time() - t0
    if stopped is not None and job.step < (epoch + 1) * job.steps_per_epoch:
        job.checkpoints.save(job.step, job.state, job.history,
                             epoch_so_far={"losses": losses, "accuracies": accuracies, "seconds": seconds})
        exit_stopped(job.step, job.workdir, stopped)
    return Trained({"train_loss": float(np.mean(losses)), "train_accuracy": float(np.mean(accuracies))},
                   seconds, len(losses) * batch_size)


def evaluate(job: Job) -> dict:
    """The test metrics over every test example (see `evaluate_batches`) of the state as `job.inference` makes
    it; array sums kept in `job.details`."""
    evaluated = job.state if job.inference is None else job.inference(job.state)
    metrics, job.details = evaluate_batches(job.eval_step, evaluated,
                                            started_without_stop_signals(job.eval_batches()), job.mesh)
    return metrics


def evaluate_batches(eval_step: Callable, state, batches: Iterable[dict], mesh) -> tuple[dict, dict]:
    """(metrics, array sums) of `eval_step` over `batches`: test loss, accuracy and count, and the top-5
    accuracy when the step counts "correct_top5". Every batch is dispatched before one fetch; scalar sums add
    up on the host in float64, array sums (a confusion matrix) on the device."""
    scalars, arrays = [], {}
    for batch in batches:
        with compilation_cache.gc_paused():  # as in train_epoch
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
        try:
            write_atomic(job.workdir / "metrics.jsonl",
                         "".join(json.dumps(h) + "\n" for h in job.history).encode())
            plots.curves(job.history, job.workdir / "curves.png")
            if job.write_details is not None:
                job.write_details(job.workdir, tested, job.details)
        except OSError as e:
            raise write_failed(f"writing {Path(e.filename or 'results').name}", e, job.workdir,
                               job.checkpoints.latest_step()) from None
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


def save_final_model(job: Job, config: dict, serving: dict) -> None:
    """model/: the trained network as `python -m convert` writes one (`config`: googlenet's arguments), the
    variables its evaluation ran (`job.inference`'s), with what serving it needs (`serving`: image size, resize,
    normalisation, class names), for predict, export, --evaluate and --init."""
    path = job.workdir / "model"
    if path.exists():  # a run resumed after it had finished
        print(f"{path} exists already; left as it is", flush=True)
        return
    variables = (job.inference.variables(job.state) if job.inference is not None else
                 jax.device_get({"params": job.state.params, "batch_stats": job.state.batch_stats}))
    save_model(path, variables, config, serving)
    print(f"wrote {path}: the trained model (predict --weights {path}, --init {path})", flush=True)
