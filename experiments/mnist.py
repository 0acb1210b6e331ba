"""GoogLeNet on MNIST: `python -m experiments.mnist --help`.

Two presets (flat configs below; every flag overrides its field):

- ``quick`` (default on a CPU): torchvision's GoogLeNet with 1 input channel on 32x32 digits, Nesterov SGD
  with warmup and cosine decay, small random shifts; a few minutes on 2 CPU cores.
- ``writeup`` (default on an accelerator): the write-up's recipe: its network and loss, 224x224, batch
  300, SGD lr 0.001 momentum 0.7, 50 epochs; `--init googlenet.pth` warm-starts from torchvision's weights.

The job writes to `--workdir`: config.json, metrics.jsonl (one line per epoch), curves.png, orbax
checkpoints (every epoch and on SIGINT/SIGTERM), and at the end model/ (the trained network with its image size,
normalisation and class names, for `python -m experiments.predict --weights` and `export`). SIGINT/SIGTERM
finish the current step (at an epoch's end, the epoch's results too), save a checkpoint and exit with status
128 + the signal number (130, 143); `--resume` continues from the latest checkpoint to the same final parameters
and metrics an uninterrupted run reaches; a second signal exits at once. One run at a time holds a --workdir
(run.lock). Bad input: one line on stderr, exit status 2; a failed write (a full disk): one line, exit status 1,
the last complete checkpoint intact.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from pathlib import Path

import jax

from experiments import cli, inference, loop, rundir, start
from experiments.cli import UsageError
from jax_googlenet import data, distributed, train
from jax_googlenet.model import RENAMED, accepted_sides, googlenet
from jax_googlenet.ops import compiler_options

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


def current_name(kind: str):
    """An argparse type for a --preset or --variant value: a name renamed since (`jax_googlenet.model.RENAMED`)
    is refused in one line that gives the new one."""

    def check(text: str) -> str:
        if text in RENAMED:
            raise argparse.ArgumentTypeError(f"the {kind} {text!r} is now called {RENAMED[text]!r}")
        return text

    return check


def parse_args(argv):
    p = cli.Parser(prog="python -m experiments.mnist", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", default=None, help="where MNIST comes from: auto (default: tfds if prepared in "
                   "--data-dir or downloadable within 2 s, else sample), tfds (tensorflow-datasets), sample "
                   "(5,000 real digits shipped in the package, 1,000 held out), or idx:DIR (the four IDX files "
                   "in DIR, .gz or not, e.g. torchvision's MNIST/raw)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (default: TFDS's, ~/tensorflow_datasets)")
    p.add_argument("--preset", type=current_name("preset"), choices=sorted(PRESETS), default=None,
                   help="recipe to start from (default: quick on a CPU, writeup on a GPU/TPU)")
    p.add_argument("--variant", type=current_name("variant"), choices=("torchvision", "paper", "writeup"),
                   default=None, help="network: torchvision (BatchNorm, torchvision's GoogLeNet), paper "
                   "(arXiv:1409.4842), writeup (the write-up's)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size (split over devices and processes; must divide by the device count)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of SGD")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    p.add_argument("--image-size", type=int, default=None,
                   help="side the 28x28 digits are resized to on the device (bilinear)")
    p.add_argument("--init", default=None, metavar="FILE.pth",
                   help="warm-start from torchvision GoogLeNet weights (a state_dict .pth), as the write-up does")
    p.add_argument("--seed", type=int, default=None, help="seed of initialisation, data order, dropout and "
                   "augmentation (default 0)")
    cli.add_run_flags(p, "mnist-<preset>")
    args = p.parse_args(argv)
    cli.check_run_flags(args, positive=("epochs", "batch_size", "image_size"))
    if args.init is not None and not Path(args.init).is_file():
        raise UsageError(f"--init {args.init}: no such file")
    start.check_weights_file("--init", args.init)
    return args


# Flags that are config fields (None: not given).
CONFIG_FLAGS = ("variant", "epochs", "batch_size", "lr", "momentum", "image_size", "seed", "dtype", "data",
                "data_dir")
# The fields every run's config.json holds (later ones, e.g. the data's sizes, are checked where present).
STORED = ("preset", *PRESETS["quick"], "seed", "dtype", "data", "data_dir")
# What each config field holds, checked on --resume.
FIELDS = {"preset": rundir.one_of(*PRESETS), "variant": rundir.one_of("torchvision", "paper", "writeup"),
          "loss_mode": rundir.one_of(*train.LOSS_MODES), "in_channels": rundir.Field("1 or 3", lambda v: v in (1, 3)
                                                                                       and type(v) is int),
          "aux_logits": rundir.FLAG, "image_size": rundir.POSITIVE, "batch_size": rundir.POSITIVE,
          "epochs": rundir.POSITIVE, "lr": rundir.NUMBER, "momentum": rundir.NUMBER, "nesterov": rundir.FLAG,
          "schedule": rundir.one_of("constant", "cosine", "onecycle"), "warmup_epochs": rundir.NUMBER,
          "weight_decay": rundir.NUMBER, "max_shift": rundir.NATURAL, "seed": rundir.INTEGER,
          "dtype": rundir.one_of("float32", "bfloat16"), "data": rundir.TEXT, "data_dir": rundir.OPTIONAL_TEXT,
          "train_size": rundir.NATURAL, "test_size": rundir.NATURAL}
# Config fields whose values have been renamed (jax_googlenet.model.RENAMED); a run written before holds the old.
RENAMED_FIELDS = ("preset", "variant", "loss_mode")


def default_preset() -> str:
    return "quick" if jax.default_backend() == "cpu" else "writeup"


def make_config(args, stored: dict | None) -> dict:
    """The run's flat config: the preset, then the given flags; on --resume the stored one, which given flags
    must agree with."""
    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    if args.preset is not None:
        given["preset"] = args.preset
    if stored is not None:
        return rundir.resume_config(current_names(stored, args.workdir), given, args.workdir,
                                    free=("data", "data_dir"), required=STORED, fields=FIELDS)
    preset = given.get("preset") or default_preset()
    print(f"preset: {preset} ({'--preset' if args.preset else 'the default on this JAX backend'})", flush=True)
    return {"preset": preset, **PRESETS[preset], "seed": 0, "dtype": "float32", "data": "auto", "data_dir": None,
            **given}


def current_names(stored: dict, workdir: str) -> dict:
    """A stored config in today's names: a run written before a rename holds the old ones; one line says so."""
    old = {k: stored[k] for k in RENAMED_FIELDS if isinstance(stored.get(k), str) and stored[k] in RENAMED}
    if not old:
        return stored
    print(f"--resume: {workdir} was written under earlier names, read as today's: "
          + ", ".join(f"{k} {v!r} -> {RENAMED[v]!r}" for k, v in old.items()), flush=True)
    return {**stored, **{k: RENAMED[v] for k, v in old.items()}}


def run(args) -> float:
    """Train and evaluate in the run's directory, claimed first; returns the final test accuracy."""
    start.start_process(args)
    default = f"mnist-{args.preset or default_preset()}"
    with rundir.claimed(args.workdir, args.resume, default) as (workdir, stored), rundir.StopFlag() as stop:
        job = set_up(args, workdir, stored)
        accuracy = loop.train_and_evaluate(job, stop)
        save_final_model(job)
        return accuracy


def save_final_model(job: loop.Job) -> None:
    """model/ (`loop.save_final_model`): the network as evaluated, its image size, MNIST's normalisation and
    the digits as class names."""
    cfg = job.cfg
    loop.save_final_model(job, {"variant": cfg["variant"], "num_classes": data.NUM_CLASSES,
                                "in_channels": cfg["in_channels"], "aux_logits": cfg["aux_logits"]},
                          {"image_size": cfg["image_size"], "resize_size": cfg["image_size"],
                           "mean": [data.MEAN] * cfg["in_channels"], "std": [data.STD] * cfg["in_channels"],
                           "class_names": [str(d) for d in range(data.NUM_CLASSES)]})


def set_up(args, workdir: Path, stored: dict | None) -> loop.Job:
    """Set up or restore: the config, mesh, data, state and steps of the run in `workdir`, its state restored
    from the latest checkpoint on --resume (`stored`: its config)."""
    cfg = make_config(args, stored)
    check_image_size(cfg)
    mesh = start.make_mesh(args.devices, cfg["batch_size"])

    dataset = data.load_mnist(cfg["data"], cfg["data_dir"])
    print(f"dataset: {dataset.name}", flush=True)
    sizes = {"train_size": len(dataset.train), "test_size": len(dataset.test)}
    if stored is not None:
        rundir.check_same_data(stored, sizes, workdir, cfg["data"])
    cfg.update(sizes)
    batch_size = cfg["batch_size"]
    steps_per_epoch = data.steps_per_epoch(len(dataset.train), batch_size)
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {batch_size} is larger than the {len(dataset.train)} training images")
    start.enable_compile_cache(args)

    init_rng, dropout_rng, shift_rng = jax.random.split(jax.random.key(cfg["seed"]), 3)
    lead = jax.process_index() == 0
    state = create_state(cfg, init_rng, steps_per_epoch, init=None if args.resume else args.init, lead=lead)
    model = state.apply_fn.__self__  # the GoogLeNet create_state built
    train_step, eval_step, evaluated = make_steps(cfg, model, dropout_rng, shift_rng, mesh, lead=lead,
                                                  images=inference_images(args, len(dataset.train)),
                                                  recalibration_batches=functools.partial(
                                                      recalibration_batches, dataset.train, cfg))
    job = loop.Job(
        cfg=cfg, workdir=workdir, mesh=mesh, state=distributed.replicate(state, mesh),
        steps_per_epoch=steps_per_epoch, train_step=train_step, eval_step=eval_step,
        train_batches=lambda epoch, first: data.train_batches(dataset.train, global_batch=batch_size,
                                                              seed=cfg["seed"], epoch=epoch, start_step=first),
        eval_batches=lambda: data.eval_batches(dataset.test, global_batch=batch_size), lead=lead,
        inference=evaluated)
    loop.restore_or_start(job, args.resume)
    return job


def create_state(cfg: dict, rng, steps_per_epoch: int, *, init: str | None, lead: bool):
    """The model (its line printed) and a fresh train state with the config's optimizer; `init`: torchvision
    weights to start from."""
    model = googlenet(cfg["variant"], num_classes=data.NUM_CLASSES, in_channels=cfg["in_channels"],
                      aux_logits=cfg["aux_logits"], dtype=jax.numpy.dtype(cfg["dtype"]))
    if lead:
        print(f"model: {cfg['variant']} variant, {cfg['dtype']}, {start.kernels(model, cfg)}", flush=True)
    size = cfg["image_size"]
    state = train.create_train_state(rng, model, (1, size, size, cfg["in_channels"]),
                                     start.make_optimizer(cfg, steps_per_epoch))
    return start.warm_start(init, model, state) if init else state


def inference_images(args, train_size: int) -> int:
    """The training images BatchNorm is recalibrated over before each evaluation (`--bn-recalibrate`)."""
    return inference.recalibrate_images(args.bn_recalibrate, train_size)


def recalibration_batches(train, cfg: dict, images: int):
    """Whole batches of the training digits, shuffled by the seed, as the evaluation preprocesses them (no
    shift)."""
    batch = cfg["batch_size"]
    return itertools.islice(data.train_batches(train, global_batch=batch, seed=cfg["seed"], epoch=0),
                            inference.whole_batches(images, batch))


def make_steps(cfg: dict, model, dropout_rng, shift_rng, mesh, *, images: int, recalibration_batches, lead: bool):
    """The jitted train step and folded eval step, and what the eval step takes (`experiments.inference`: the
    BatchNorm statistics recalibrated over `images` training digits): uint8 digits resized and normalised on
    the device, shifted at random in training (`max_shift`)."""
    preprocess = data.make_preprocess(cfg["image_size"], channels=cfg["in_channels"])
    options = compiler_options(cfg["image_size"], cfg["dtype"])
    jitted = train.jit_train_step(options, step=train_step, mesh=mesh, loss_mode=cfg["loss_mode"],
                                  preprocess=preprocess, max_shift=cfg["max_shift"])
    evaluated = inference.Inference(model, image_shape=(cfg["image_size"], cfg["image_size"], cfg["in_channels"]),
                                    images=images, batches=recalibration_batches, preprocess=preprocess,
                                    options=options, mesh=mesh, lead=lead)
    inference_options = compiler_options(cfg["image_size"], cfg["dtype"], step="inference")
    return (lambda state, batch: jitted(state, batch, dropout_rng, shift_rng),
            inference.jit_folded_eval_step(model, inference_options, mesh=mesh, preprocess=preprocess), evaluated)


def train_step(state, batch, dropout_rng, shift_rng, *, loss_mode: str, preprocess, max_shift: int):
    """`train.train_step` on the digits shifted at random on the device by up to `max_shift` pixels, keyed by the
    step so a resumed run draws the same shifts."""
    if max_shift:
        batch = {**batch, "image": data.random_shift(batch["image"], jax.random.fold_in(shift_rng, state.step),
                                                     max_shift)}
    return train.train_step(state, batch, dropout_rng, loss_mode=loss_mode, preprocess=preprocess)


def check_image_size(cfg: dict) -> None:
    """The network accepts the config's image size (its aux heads' fully connected layers fix a band)."""
    lo, hi = accepted_sides(cfg["variant"], cfg["aux_logits"])
    if not lo <= cfg["image_size"] <= (hi or cfg["image_size"]):
        band = f"{lo} to {hi}" if hi else f"at least {lo}"
        raise UsageError(f"--image-size {cfg['image_size']}: the {cfg['variant']} variant with aux heads "
                         f"accepts {band}")


def main(argv=None) -> int:
    return cli.run_cli(lambda: f"test_accuracy={run(parse_args(argv)):.4f}", bad_input=(data.DataError,))


if __name__ == "__main__":
    cli.exit_process(main())
