"""GoogLeNet on MNIST: `python -m experiments.mnist --help`.

Two presets (flat configs below; every flag overrides its field):

- ``quick`` (default on a CPU): torchvision's GoogLeNet with 1 input channel on 32x32 digits, Nesterov SGD
  with warmup and cosine decay, small random shifts; a few minutes on 2 CPU cores.
- ``writeup`` (default on an accelerator): the write-up's recipe: its network and loss, 224x224, batch
  300, SGD lr 0.001 momentum 0.7, 50 epochs; `--init googlenet.pth` warm-starts from torchvision's weights.

The job writes to `--workdir`: config.json, metrics.jsonl (one line per epoch), curves.png, and orbax
checkpoints (every epoch and on SIGINT/SIGTERM). SIGINT/SIGTERM finish the current step, save a checkpoint
and exit with status 128 + the signal number (130, 143); `--resume` continues from the latest checkpoint to
the same final parameters an uninterrupted run reaches. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

# Flat configs. max_shift: random translation of the 28x28 digits by up to that many pixels (on the device);
# warmup_epochs: linear warmup before the cosine decay; weight_decay: coupled L2, as torch's SGD.
PRESETS = {
    # Sized for 2 CPU cores: the 28x28 digits upsampled to 32x32 give the inception stages 4x4, 2x2, 1x1 grids.
    "quick": dict(
        variant="torchvision", loss_mode="paper", in_channels=1, aux_logits=True, image_size=32,
        batch_size=64, epochs=7, lr=0.02, momentum=0.9, nesterov=True, schedule="cosine", warmup_epochs=0.5,
        weight_decay=5e-4, max_shift=2),
    # The write-up, exactly.
    "writeup": dict(
        variant="writeup", loss_mode="writeup", in_channels=1, aux_logits=True, image_size=224, batch_size=300,
        epochs=50, lr=0.001, momentum=0.7, nesterov=False, schedule="constant", warmup_epochs=0.0,
        weight_decay=0.0, max_shift=0),
}
MAX_TO_KEEP = 3


class UsageError(Exception):
    """Bad input (exit status 2); the message is the one line the user sees."""


class TrainingError(Exception):
    """The run went wrong, e.g. a NaN loss (exit status 1); one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def parse_args(argv):
    p = Parser(prog="python -m experiments.mnist", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", default=None, help="where MNIST comes from: auto (default: tfds if prepared in "
                   "--data-dir or downloadable within 2 s, else sample), tfds (tensorflow-datasets), sample "
                   "(5,000 real digits shipped in the package, 1,000 held out), or idx:DIR (the four IDX files "
                   "in DIR, .gz or not, e.g. torchvision's MNIST/raw)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (default: TFDS's, ~/tensorflow_datasets)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="recipe to start from (default: quick on a CPU, writeup on a GPU/TPU)")
    p.add_argument("--variant", choices=("torchvision", "paper", "writeup"), default=None,
                   help="network: torchvision (BatchNorm, torchvision's GoogLeNet), paper (arXiv:1409.4842), "
                   "writeup (the write-up's)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size (split over devices and processes; must divide by the device count)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of SGD")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    p.add_argument("--image-size", type=int, default=None,
                   help="side the 28x28 digits are resized to on the device (bilinear)")
    p.add_argument("--workdir", default=None, help="output directory (default: runs/mnist-<preset>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --workdir from its latest checkpoint (flags default to its config)")
    p.add_argument("--init", default=None, metavar="FILE.pth",
                   help="warm-start from torchvision GoogLeNet weights (a state_dict .pth), as the write-up does")
    p.add_argument("--seed", type=int, default=None, help="seed of initialisation, data order, dropout and "
                   "augmentation (default 0)")
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
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "image_size", "devices"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.init is not None and not Path(args.init).is_file():
        raise UsageError(f"--init {args.init}: no such file")
    if args.resume and args.workdir is None:
        raise UsageError("--resume needs the --workdir of the run to continue")
    return args


# Flags that are config fields (None: not given).
CONFIG_FLAGS = ("variant", "epochs", "batch_size", "lr", "momentum", "image_size", "seed", "dtype", "data",
                "data_dir")


def default_preset() -> str:
    import jax

    return "quick" if jax.default_backend() == "cpu" else "writeup"


def make_config(args, stored: dict | None) -> dict:
    """The run's flat config: the preset, then the given flags; on --resume the stored one, which given flags
    must agree with."""
    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    if args.preset is not None:
        given["preset"] = args.preset
    if stored is not None:
        for key, value in given.items():
            if key not in ("data", "data_dir") and stored.get(key) != value:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"--resume: the checkpoint in {args.workdir} was trained with {flag} "
                                 f"{stored.get(key)}, not {value}")
        return {**stored, **{k: v for k, v in given.items() if k in ("data", "data_dir")}}
    preset = given.get("preset") or default_preset()
    print(f"preset: {preset} ({'--preset' if args.preset else 'the default on this JAX backend'})", flush=True)
    return {"preset": preset, **PRESETS[preset], "seed": 0, "dtype": "float32", "data": "auto", "data_dir": None,
            **given}


def read_stored_config(workdir: Path) -> dict:
    path = workdir / "config.json"
    if not path.is_file():
        raise UsageError(f"--resume: {workdir} holds no run (no config.json)")
    return json.loads(path.read_text())


def write_atomic(path: Path, data: bytes) -> None:
    """Write a temporary file beside `path`, then rename it: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def plot(history: list[dict], path: Path) -> None:
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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


class StopFlag:
    """Set by SIGINT/SIGTERM while active: the loop finishes its step, saves and exits."""

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


def run(args) -> float:
    """Train and evaluate; returns the final test accuracy."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from jax_googlenet import compilation_cache, data, distributed, train
    from jax_googlenet.model import accepted_sides, googlenet
    from jax_googlenet.ops import resolve_impl

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if not args.no_compile_cache:
        compilation_cache.enable()
    workdir = Path(args.workdir) if args.workdir else None
    stored = read_stored_config(workdir) if args.resume else None
    if workdir is not None and not args.resume and (workdir / "config.json").exists():
        raise UsageError(f"--workdir {workdir} already holds a run; add --resume to continue it or choose "
                         f"another --workdir")
    cfg = make_config(args, stored)
    if workdir is None:
        if jax.process_count() > 1:
            raise UsageError("a multi-process run needs --workdir, on a filesystem every process shares")
        workdir = Path("runs") / f"mnist-{cfg['preset']}-{time.strftime('%Y%m%d-%H%M%S')}"

    lo, hi = accepted_sides(cfg["variant"], cfg["aux_logits"])
    if not lo <= cfg["image_size"] <= (hi or cfg["image_size"]):
        band = f"{lo} to {hi}" if hi else f"at least {lo}"
        raise UsageError(f"--image-size {cfg['image_size']}: the {cfg['variant']} variant with aux heads "
                         f"accepts {band}")
    try:
        mesh = distributed.make_mesh(args.devices)
        distributed.check_batch_size(cfg["batch_size"], mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    lead = jax.process_index() == 0
    print(distributed.describe(mesh), flush=True)

    dataset = data.load(cfg["data"], cfg["data_dir"])
    print(f"dataset: {dataset.name}", flush=True)
    steps_per_epoch = data.steps_per_epoch(len(dataset.train), cfg["batch_size"])
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {cfg['batch_size']} is larger than the {len(dataset.train)} "
                         f"training images")
    total_steps = steps_per_epoch * cfg["epochs"]

    dtype = jax.numpy.dtype(cfg["dtype"])
    model = googlenet(cfg["variant"], num_classes=data.NUM_CLASSES, in_channels=cfg["in_channels"],
                      aux_logits=cfg["aux_logits"], dtype=dtype)
    if lead:
        print(f"model: {cfg['variant']} variant, {cfg['dtype']}, convolutions and pools: "
              f"{resolve_impl(model.impl)} (chosen for the {jax.default_backend()} backend)", flush=True)
    tx = train.make_optimizer(cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                              weight_decay=cfg["weight_decay"], schedule=cfg["schedule"],
                              total_steps=total_steps,
                              warmup_steps=round(cfg["warmup_epochs"] * steps_per_epoch))
    init_rng, dropout_rng, shift_rng = jax.random.split(jax.random.key(cfg["seed"]), 3)
    size = cfg["image_size"]
    state = train.create_train_state(init_rng, model, (1, size, size, cfg["in_channels"]), tx)
    if args.init and not args.resume:
        state = warm_start(args.init, model, state)
    state = distributed.replicate(state, mesh)

    checkpoints = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP))
    history = []  # one record per finished epoch; saved in every checkpoint, so metrics.jsonl follows resumes
    if args.resume:
        step = checkpoints.latest_step()
        if step is None:
            raise UsageError(f"--resume: {workdir} holds no checkpoint")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        try:
            restored = checkpoints.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:  # a tree or shape that config.json did not announce
            raise UsageError(f"--resume: checkpoint {step} in {workdir} does not fit this model: "
                             f"{str(e).splitlines()[0]}") from None
        state, history = restored.state, restored.meta["history"]
        print(f"resumed from step {step} (epoch {step // steps_per_epoch + 1}, "
              f"step {step % steps_per_epoch} of {steps_per_epoch})", flush=True)
    elif lead:
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomic(workdir / "config.json", json.dumps(cfg, indent=1).encode())

    preprocess = data.make_preprocess(size, channels=cfg["in_channels"])
    max_shift = cfg["max_shift"]

    def step_fn(state, batch):
        if max_shift:  # augmentation on the device, keyed by the step so a resumed run draws the same shifts
            shift_key = jax.random.fold_in(shift_rng, state.step)
            batch = {**batch, "image": data.random_shift(batch["image"], shift_key, max_shift)}
        return train.train_step(state, batch, dropout_rng, loss_mode=cfg["loss_mode"], preprocess=preprocess)

    replicated = distributed.replicated(mesh)
    # without_gc: the first calls trace, lower and compile without Python's collector walking the trace
    train_step = compilation_cache.without_gc(jax.jit(step_fn, donate_argnums=0, out_shardings=replicated))
    eval_step = compilation_cache.without_gc(
        jax.jit(lambda s, b: train.eval_step(s, b, preprocess=preprocess), out_shardings=replicated))

    def save(step: int) -> None:
        checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave({"history": history})), force=True)
        checkpoints.wait_until_finished()

    def evaluate() -> dict:
        outs = jax.device_get([eval_step(state, distributed.shard_batch(batch, mesh))  # one fetch, at the end
                               for batch in data.eval_batches(dataset.test, global_batch=cfg["batch_size"])])
        sums = {k: sum(float(out[k]) for out in outs) for k in ("loss", "correct", "count")}
        return {"test_loss": sums["loss"] / sums["count"], "test_accuracy": sums["correct"] / sums["count"],
                "test_count": int(sums["count"])}

    with StopFlag() as stop:
        step = int(state.step)
        for epoch in range(step // steps_per_epoch, cfg["epochs"]):
            skip = step - epoch * steps_per_epoch
            batches = data.train_batches(dataset.train, global_batch=cfg["batch_size"], seed=cfg["seed"],
                                         epoch=epoch, start_step=skip)
            bar = tqdm(total=steps_per_epoch * cfg["batch_size"], initial=skip * cfg["batch_size"], unit="img",
                       desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not lead, dynamic_ncols=True)
            losses, accuracies, pending, t0 = [], [], None, time.time()

            def collect(at_step, metrics):  # reading the last step's metrics lets the device run one step ahead
                loss, accuracy = (float(v) for v in jax.device_get((metrics["loss"], metrics["accuracy"])))
                if not math.isfinite(loss):
                    bar.close()
                    good = checkpoints.latest_step()
                    raise TrainingError(f"the loss became {loss} at step {at_step}; stopped without saving. Last "
                                        f"good checkpoint: {good if good is not None else 'none'} in {workdir}")
                losses.append(loss)
                accuracies.append(accuracy)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                bar.update(cfg["batch_size"])

            for batch in batches:
                state, metrics = train_step(state, distributed.shard_batch(batch, mesh))
                step += 1
                if pending is not None:
                    collect(*pending)
                pending = (step, metrics)
                if stop.signum is not None:
                    break
            if pending is not None:
                collect(*pending)
            bar.close()
            if stop.signum is not None:
                save(step)
                print(f"stopped by signal {stop.signum} at step {step}: saved checkpoint {step} in {workdir}; "
                      f"continue with --resume --workdir {workdir}", file=sys.stderr, flush=True)
                sys.exit(128 + stop.signum)
            seconds = time.time() - t0
            history.append({"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
                            "train_accuracy": float(np.mean(accuracies)), **evaluate(),
                            "epoch_seconds": round(seconds, 2),
                            "images_per_second": round(len(losses) * cfg["batch_size"] / seconds, 1)})
            save(step)
            if lead:
                write_atomic(workdir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
                plot(history, workdir / "curves.png")
                h = history[-1]
                print(f"epoch {h['epoch']}: train_loss={h['train_loss']:.4f} test_loss={h['test_loss']:.4f} "
                      f"test_accuracy={h['test_accuracy']:.4f} ({h['test_count']} images, {seconds:.1f} s)",
                      flush=True)
        checkpoints.close()
        print(f"wrote {workdir}: config.json, metrics.jsonl, curves.png, checkpoints/{step}", flush=True)
        return history[-1]["test_accuracy"]


def warm_start(path: str, model, state):
    """Load torchvision weights through the converter (`convert.load_pretrained`)."""
    try:
        from convert import load_pretrained
    except ImportError as e:
        raise UsageError(f"--init needs convert.load_pretrained and torch ({e})") from None
    variables = load_pretrained(path, model, {"params": state.params, "batch_stats": state.batch_stats})
    print(f"initialised from {path}", flush=True)
    return state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}))


def main(argv=None) -> int:
    from jax_googlenet.data import DataError

    try:
        args = parse_args(argv)
        accuracy = run(args)
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"test_accuracy={accuracy:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
