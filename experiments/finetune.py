"""Fine-tune or evaluate GoogLeNet on any image dataset: `python -m experiments.finetune --help`.

Trains torchvision's GoogLeNet on an image folder (`--data folder:DIR`, torchvision's ImageFolder layout) or a
prepared TFDS dataset (`--data tfds:NAME`): from scratch, or warm-started from torchvision's ImageNet weights
(`--init googlenet-1378be20.pth`, or a checkpoint written by `python -m convert` or by this job) with fresh heads
for the dataset's classes. Modes: full fine-tuning (default), a smaller learning rate for the backbone than for
the heads (`--backbone-lr-scale 0.1`), or a linear probe (`--freeze-backbone`: only the classifier trains, the
backbone runs in inference mode with its running statistics). The recipe is torchvision's reference one:
SGD momentum 0.9, linear warmup then cosine decay, weight decay 1e-4, RandomResizedCrop 224 and flips for
training, Resize 256 and CenterCrop 224 for evaluation (decoded and resized on the host in grain's worker
processes, normalised on the device); `--label-smoothing 0.1` is optional.

`--evaluate WEIGHTS` only evaluates a .pth or a checkpoint directory on the dataset's held-out images and prints
top-1 / top-5, e.g. torchvision's ImageNet weights on an ImageNet validation folder (the synset layout) or on
`tfds:imagenet2012` / `tfds:imagenet_v2`.

The job writes to `--workdir`: config.json, metrics.jsonl (one line per epoch: train loss and accuracy, test
loss, top-1 and top-5), curves.png, evaluation.json (per-class accuracy and the confusion matrix of the latest
evaluation), confusion.png, orbax checkpoints (every epoch and on SIGINT/SIGTERM; `--resume` continues from
the latest), and at the end model/ (the trained network, for --evaluate and --init; jax_googlenet.checkpoint.
load_model reads it). One run at a time holds a --workdir (run.lock); SIGINT/SIGTERM, to the job or its whole
process group (its data workers leave the stop to it), save a checkpoint and exit 130/143. Bad input: one line
on stderr, exit status 2, before anything is written; a failed write (a full disk): one line, exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import os
from pathlib import Path

import jax
import numpy as np

from experiments import cli, inference, loop, plots, progress, rundir, start
from experiments.cli import UsageError
from jax_googlenet import data, distributed, imagenet, train
from jax_googlenet.data import folder, pipeline, transforms
from jax_googlenet.model import accepted_sides, googlenet
from jax_googlenet.ops import compiler_options, xla_kernels

# The flat config: torchvision's reference recipe (references/classification/train.py) at a fine-tuning
# learning rate for batch 32; warmup_epochs: linear warmup before the cosine decay; weight_decay: coupled L2.
DEFAULTS = dict(
    variant="torchvision", aux_logits=True, loss_mode="paper", image_size=224, resize_size=None, batch_size=32,
    epochs=10, lr=0.01, momentum=0.9, nesterov=False, schedule="cosine", warmup_epochs=1.0, weight_decay=1e-4,
    label_smoothing=0.0, backbone_lr_scale=1.0, freeze_backbone=False, crop_scale=0.08, hflip=0.5, init=None,
    seed=0, dtype="float32", data=None, data_dir=None, val_fraction=None, val_split=None, bad_images="skip")
# Flags that are config fields (None: not given); FREE ones may change on --resume.
CONFIG_FLAGS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing",
                "backbone_lr_scale", "image_size", "resize_size", "crop_scale", "hflip", "init", "seed", "dtype",
                "data", "data_dir", "val_fraction", "val_split", "bad_images")
FREE = ("data", "data_dir", "bad_images")
# The fields every run's config.json holds (later ones, e.g. the data's sizes, are checked where present).
STORED = (*DEFAULTS, "classes", "transform_input")
# What each config field holds, checked on --resume.
FIELDS = {"variant": rundir.one_of("torchvision"), "aux_logits": rundir.FLAG,
          "loss_mode": rundir.one_of(*train.LOSS_MODES), "image_size": rundir.POSITIVE,
          "resize_size": rundir.POSITIVE, "batch_size": rundir.POSITIVE, "epochs": rundir.POSITIVE,
          "lr": rundir.NUMBER, "momentum": rundir.NUMBER, "nesterov": rundir.FLAG,
          "schedule": rundir.one_of("constant", "cosine", "onecycle"), "warmup_epochs": rundir.NUMBER,
          "weight_decay": rundir.NUMBER, "label_smoothing": rundir.FRACTION, "backbone_lr_scale": rundir.NUMBER,
          "freeze_backbone": rundir.FLAG, "crop_scale": rundir.FRACTION, "hflip": rundir.FRACTION,
          "init": rundir.OPTIONAL_TEXT, "seed": rundir.INTEGER, "dtype": rundir.one_of("float32", "bfloat16"),
          "data": rundir.TEXT, "data_dir": rundir.OPTIONAL_TEXT, "val_fraction": rundir.OPTIONAL_FRACTION,
          "val_split": rundir.OPTIONAL_TEXT, "bad_images": rundir.one_of("skip", "stop"),
          "classes": rundir.TEXTS, "transform_input": rundir.FLAG, "train_size": rundir.NATURAL,
          "test_size": rundir.NATURAL}


def parse_args(argv):
    p = cli.Parser(prog="python -m experiments.finetune", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="folder:DIR (one subfolder per class; DIR/train and DIR/val, or DIR with --val-fraction) "
                   "or tfds:NAME (a TFDS image-classification dataset prepared as array_record; never downloaded)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory (default: TFDS's, ~/tensorflow_datasets)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="hold out this seeded fraction of the training images (default: the dataset's own "
                   "held-out split, else 0.1)")
    p.add_argument("--val-split", default=None,
                   help="TFDS split to evaluate on (default: validation if the dataset has it, else test)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="warm-start from a torchvision GoogLeNet .pth or a checkpoint directory (python -m convert, "
                   "or this job's model/); the heads are fresh for the dataset's classes (default: from scratch)")
    p.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="linear probe: train the classifier fc alone, the backbone frozen in inference mode")
    p.add_argument("--backbone-lr-scale", type=float, default=None,
                   help="the backbone's learning rate as a fraction of the heads' (default 1)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size (default 32; split over devices and processes)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of SGD (default 0.01)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="coupled L2 weight decay (default 1e-4)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warmup before the cosine decay (default 1)")
    p.add_argument("--label-smoothing", type=float, default=None, help="label smoothing (default 0)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the training crops and evaluation crops (default 224)")
    p.add_argument("--resize-size", type=int, default=None,
                   help="shorter side images are resized to before the evaluation's centre crop "
                   "(default: 256/224 of --image-size)")
    p.add_argument("--crop-scale", type=float, default=None, metavar="MIN",
                   help="RandomResizedCrop's smallest crop as a fraction of the image's area (default 0.08, "
                   "torchvision's; larger for images whose class a small part does not show, e.g. digits)")
    p.add_argument("--hflip", type=float, default=None, metavar="P",
                   help="probability of a horizontal flip in training (default 0.5; 0 for text or digits)")
    p.add_argument("--no-aux", dest="aux_logits", action="store_false", default=None,
                   help="no auxiliary heads (default: with them, the paper's loss CE + 0.3 (CE aux1 + CE aux2))")
    p.add_argument("--bad-images", choices=("skip", "stop"), default=None,
                   help="an image that cannot be read: report it once and skip it (default), or stop the run")
    p.add_argument("--workers", type=int, default=None,
                   help="grain worker processes decoding and resizing images (default: half the CPU cores, "
                   "at least 1; 0: threads of the main process)")
    p.add_argument("--max-pixels", type=int, default=folder.MAX_PIXELS, metavar="N",
                   help="the most pixels an image may decode to, read from its header before decoding; a larger "
                   f"one is unreadable (default {folder.MAX_PIXELS:,}, where PIL warns of a decompression bomb)")
    p.add_argument("--max-resized-pixels", type=int, default=transforms.MAX_RESIZED_PIXELS, metavar="N",
                   help="beyond this many pixels in the evaluation's resized image, only the region its centre "
                   f"crop keeps is resized (default {transforms.MAX_RESIZED_PIXELS:,})")
    p.add_argument("--evaluate", default=None, metavar="WEIGHTS",
                   help="only evaluate WEIGHTS (a .pth or a checkpoint directory) on --data's held-out images "
                   "and print top-1 / top-5")
    p.add_argument("--seed", type=int, default=None, help="seed of initialisation, held-out split, data order, "
                   "augmentation and dropout (default 0)")
    cli.add_run_flags(p, "finetune")
    args = p.parse_args(argv)
    cli.check_run_flags(args, positive=("epochs", "batch_size", "image_size", "resize_size", "max_pixels",
                                        "max_resized_pixels"))
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be at least 0, got {args.workers}")
    if args.label_smoothing is not None and not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing {args.label_smoothing:g}: choose a value in [0, 1)")
    if args.crop_scale is not None and not 0 < args.crop_scale <= 1:
        raise UsageError(f"--crop-scale {args.crop_scale:g}: choose a fraction in (0, 1]")
    if args.hflip is not None and not 0 <= args.hflip <= 1:
        raise UsageError(f"--hflip {args.hflip:g}: choose a probability in [0, 1]")
    if args.backbone_lr_scale is not None and args.backbone_lr_scale < 0:
        raise UsageError(f"--backbone-lr-scale must be at least 0, got {args.backbone_lr_scale:g}")
    for flag, path in (("--init", args.init), ("--evaluate", args.evaluate)):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{flag} {path}: no such file or directory")
        start.check_weights_file(flag, path)
    if args.data is None and not args.resume:
        raise UsageError("--data is required: folder:DIR or tfds:NAME")
    if args.evaluate and args.resume:
        raise UsageError("--evaluate evaluates weights as they are; drop --resume")
    return args


def make_config(args, stored: dict | None) -> dict:
    """The run's flat config: the defaults, then the given flags; on --resume the stored one, which given flags
    must agree with (but for the data's location and --bad-images)."""
    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    for key in ("aux_logits", "freeze_backbone"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key)
    if stored is not None:
        return rundir.resume_config(stored, given, args.workdir, free=FREE, required=STORED, fields=FIELDS)
    cfg = {**DEFAULTS, **given}
    if cfg["resize_size"] is None:
        cfg["resize_size"] = round(cfg["image_size"] * 256 / 224)
    return cfg


def workers(args) -> int:
    """--workers, or half the CPU cores (at least 1), printed."""
    if args.workers is not None:
        return args.workers
    chosen = max(1, (os.cpu_count() or 2) // 2)
    print(f"data workers: {chosen} grain worker process{'es' if chosen > 1 else ''} (half the {os.cpu_count()} "
          f"CPU cores; --workers chooses)", flush=True)
    return chosen


# ----------------------------------------------------------------------------------------------- set up


def run(args) -> float:
    """Train and evaluate in the run's directory, claimed first, then write model/; returns the final top-1
    accuracy."""
    start.start_process(args)
    with rundir.claimed(args.workdir, args.resume, "finetune") as (workdir, stored), rundir.StopFlag() as stop:
        job = set_up(args, workdir, stored)
        try:
            accuracy = loop.train_and_evaluate(job, stop)
        finally:  # also on a signal's exit
            job.train_batches.close()
        save_final_model(job)
        return accuracy


def set_up(args, workdir: Path, stored: dict | None) -> loop.Job:
    """Set up or restore: the config, mesh, data, state and steps of the run in `workdir` (`stored`: its config
    on --resume)."""
    cfg = make_config(args, stored)
    check_sizes(cfg)
    dataset = load_data(cfg, max_pixels=args.max_pixels)
    sizes = {"train_size": len(dataset.train), "test_size": len(dataset.val)}
    if stored is not None:
        if dataset.classes != cfg["classes"]:
            raise UsageError(f"--resume: the run in {workdir} was trained on {len(cfg['classes'])} classes "
                             f"({', '.join(cfg['classes'][:3])} ...), --data {cfg['data']} has "
                             f"{len(dataset.classes)} ({', '.join(dataset.classes[:3])} ...)")
        rundir.check_same_data(stored, sizes, workdir, cfg["data"])
    cfg.update(classes=dataset.classes, **sizes)
    if len(dataset.train) < cfg["batch_size"]:
        raise UsageError(f"--batch-size {cfg['batch_size']} is larger than the {len(dataset.train)} training "
                         f"images")
    mesh = start.make_mesh(args.devices, cfg["batch_size"])
    start.enable_compile_cache(args)
    steps_per_epoch = pipeline.steps_per_epoch(len(dataset.train), cfg["batch_size"])

    init_rng, dropout_rng = jax.random.split(jax.random.key(cfg["seed"]))
    lead = jax.process_index() == 0
    state, cfg["transform_input"] = create_state(cfg, init_rng, steps_per_epoch,
                                                 init=None if args.resume else cfg["init"], lead=lead,
                                                 stored=stored)
    model = state.apply_fn.__self__  # the GoogLeNet create_state built
    train_step, eval_step = make_steps(cfg, model, dropout_rng, mesh)
    num_workers = workers(args)
    train_batches, eval_batches = make_batches(cfg, dataset, steps_per_epoch, num_workers,
                                               max_resized_pixels=args.max_resized_pixels)
    images = inference.recalibrate_images(
        args.bn_recalibrate, len(dataset.train),
        off="--freeze-backbone: the pretrained ones" if cfg["freeze_backbone"] else None)
    evaluated = inference.Inference(
        model, image_shape=(cfg["image_size"], cfg["image_size"], model.in_channels), images=images,
        preprocess=imagenet.normalize, mesh=mesh, lead=lead,
        options=compiler_options(cfg["image_size"], cfg["dtype"]),
        batches=functools.partial(recalibration_batches, cfg, dataset.train, train_batches.check, num_workers,
                                  max_resized_pixels=args.max_resized_pixels))
    print(f"transforms: train RandomResizedCrop({cfg['image_size']}, scale=({cfg['crop_scale']:g}, 1)) + "
          f"horizontal flip p={cfg['hflip']:g}, eval Resize({cfg['resize_size']}) + CenterCrop({cfg['image_size']}) "
          f"(torchvision's, on the host)", flush=True)
    job = loop.Job(cfg=cfg, workdir=workdir, mesh=mesh, state=distributed.replicate(state, mesh),
                   steps_per_epoch=steps_per_epoch, train_step=train_step, eval_step=eval_step,
                   train_batches=train_batches, eval_batches=eval_batches, lead=lead,
                   write_details=functools.partial(write_evaluation, classes=dataset.classes),
                   inference=evaluated)
    loop.restore_or_start(job, args.resume)
    return job


def check_sizes(cfg: dict) -> None:
    """The network accepts the crops, and the evaluation's resize leaves room for its centre crop."""
    lo, _ = accepted_sides(cfg["variant"], cfg["aux_logits"])
    if cfg["image_size"] < lo:
        raise UsageError(f"--image-size {cfg['image_size']}: torchvision's GoogLeNet accepts {lo} and up")
    if cfg["resize_size"] < cfg["image_size"]:
        raise UsageError(f"--resize-size {cfg['resize_size']} is smaller than --image-size {cfg['image_size']}; "
                         f"the centre crop needs a resize of at least the crop")


def load_data(cfg: dict, *, evaluate_only: bool = False, max_pixels: int = folder.MAX_PIXELS) -> data.ImageDataset:
    """The dataset of `cfg["data"]` (printed), its errors as usage errors; images over `max_pixels` unreadable."""
    try:
        dataset = data.load_images(cfg["data"], data_dir=cfg["data_dir"], val_fraction=cfg["val_fraction"],
                                   val_split=cfg["val_split"], seed=cfg["seed"], evaluate_only=evaluate_only,
                                   max_pixels=max_pixels)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    print(f"dataset: {dataset.name}", flush=True)
    return dataset


def create_state(cfg: dict, rng, steps_per_epoch: int, *, init: str | None, lead: bool, stored: dict | None):
    """(train state, transform_input): the model for the dataset's classes (its line printed), the optimizer
    of the chosen mode, the weights from `init` when given (heads fresh)."""
    if stored is not None:
        transform_input, origin = stored["transform_input"], "resumed"
    elif init is not None:
        from convert import read_pretrained

        # torchvision builds its pretrained GoogLeNet with transform_input=True: those weights expect it.
        try:
            source, _ = read_pretrained(init)
        except (ValueError, OSError) as e:  # not a state dict, a directory without a model
            raise UsageError(f"--init {init}: {str(e).splitlines()[0]}") from None
        transform_input, origin = (True if source is None else source.transform_input), f"from {init}"
    else:
        transform_input, origin = False, "from scratch"
    model = googlenet(cfg["variant"], num_classes=len(cfg["classes"]), aux_logits=cfg["aux_logits"],
                      transform_input=transform_input, dtype=jax.numpy.dtype(cfg["dtype"]))
    if lead:
        mode = ("linear probe (fc alone; the backbone frozen, in inference mode)" if cfg["freeze_backbone"] else
                f"fine-tuning (backbone learning rate x{cfg['backbone_lr_scale']:g})")
        print(f"model: torchvision GoogLeNet, {len(cfg['classes'])} classes, {cfg['dtype']}, transform_input="
              f"{transform_input}, {origin}; {mode}; {start.kernels(model, cfg)}", flush=True)
    size = cfg["image_size"]
    state = train.create_train_state(rng, model, (1, size, size, 3), start.make_optimizer(cfg, steps_per_epoch))
    if init is not None:
        # The heads start fresh for the dataset's classes, whatever their number.
        state = start.warm_start(init, model, state, fresh=train.HEADS)
    return state, transform_input


def make_steps(cfg: dict, model, dropout_rng, mesh):
    """The jitted train (or linear-probe) step and folded eval step (`experiments.inference`) on uint8 crops,
    normalised on the device."""
    step, kwargs = (train.probe_step, {}) if cfg["freeze_backbone"] else (train.train_step,
                                                                          {"loss_mode": cfg["loss_mode"]})
    options = compiler_options(cfg["image_size"], cfg["dtype"])
    jitted = train.jit_train_step(options, step=step, mesh=mesh, preprocess=imagenet.normalize,
                                  label_smoothing=cfg["label_smoothing"], **kwargs)
    inference_options = compiler_options(cfg["image_size"], cfg["dtype"], step="inference")
    return (lambda state, batch: jitted(state, batch, dropout_rng),
            inference.jit_folded_eval_step(model, inference_options, mesh=mesh, preprocess=imagenet.normalize,
                                           num_classes=len(cfg["classes"])))


def make_batches(cfg: dict, dataset, steps_per_epoch: int, num_workers: int, *,
                 max_resized_pixels: int = transforms.MAX_RESIZED_PIXELS):
    """(train_batches(epoch, start), eval_batches()) for the loop: host transforms in grain's workers,
    unreadable images reported once and skipped (or stopping the run)."""
    size, stop = cfg["image_size"], cfg["bad_images"] == "stop"
    train_checked = data.BadImages(dataset.train, stop=stop)
    val_checked = data.BadImages(dataset.val, stop=stop)

    def stream(start_step):
        return pipeline.train_batches(
            dataset.train, global_batch=cfg["batch_size"], seed=cfg["seed"], start_step=start_step,
            stop_step=steps_per_epoch * cfg["epochs"], workers=num_workers,
            random_transform=functools.partial(data.train_transform, size=size, scale=(cfg["crop_scale"], 1.0),
                                               hflip=cfg["hflip"]))

    def eval_batches():
        transform = functools.partial(data.eval_transform, size=size, resize_to=cfg["resize_size"],
                                      max_resized_pixels=max_resized_pixels)
        return val_checked(pipeline.eval_batches(dataset.val, global_batch=cfg["batch_size"], transform=transform,
                                                 blank=data.blank(size), workers=num_workers))

    return EpochsOfOneStream(stream, steps_per_epoch, train_checked), eval_batches


def recalibration_batches(cfg: dict, source, check, num_workers: int, images: int, *,
                          max_resized_pixels: int = transforms.MAX_RESIZED_PIXELS):
    """Whole batches of `images` training images, shuffled by the seed, under the evaluation transform, for
    BatchNorm's recalibration; an unreadable image (reported once by `check`) takes a readable one's place."""
    transform = functools.partial(data.eval_transform, size=cfg["image_size"], resize_to=cfg["resize_size"],
                                  max_resized_pixels=max_resized_pixels)
    batches = pipeline.train_batches(source, global_batch=cfg["batch_size"], seed=cfg["seed"], start_step=0,
                                     stop_step=inference.whole_batches(images, cfg["batch_size"]),
                                     transform=transform, workers=num_workers)
    return ({"image": batch["image"]} for batch in check(iter(batches)))


class EpochsOfOneStream:
    """The loop's `train_batches(epoch, start)` served from one grain iterator over the rest of the run, so
    its worker processes start once, not every epoch."""

    def __init__(self, stream, steps_per_epoch: int, check):
        self.stream, self.steps_per_epoch, self.check = stream, steps_per_epoch, check
        self.batches, self.next_step = None, None

    def __call__(self, epoch: int, start: int):
        step = epoch * self.steps_per_epoch + start
        if self.batches is None or step != self.next_step:
            self.batches = self.check(iter(self.stream(step)))
        self.next_step = (epoch + 1) * self.steps_per_epoch
        return itertools.islice(self.batches, self.steps_per_epoch - start)

    def close(self) -> None:
        """Stop the worker processes. Left to the interpreter's exit, grain's shared-memory buffers outlive the
        modules that free them and each prints an error."""
        self.batches = None
        gc.collect()  # the iterator sits in reference cycles


# ----------------------------------------------------------------------------------------------- results


def per_class_accuracy(confusion, classes: list[str]) -> list[dict]:
    """[{"class", "count", "accuracy"}] from a [true, predicted] confusion matrix; accuracy None without
    examples."""
    counts = np.asarray(confusion).sum(axis=1)
    right = np.diag(np.asarray(confusion))
    return [{"class": name, "count": int(n), "accuracy": float(r / n) if n else None}
            for name, n, r in zip(classes, counts, right)]


def write_evaluation(directory: Path, metrics: dict, details: dict, *, classes: list[str]) -> None:
    """evaluation.json (top-1, top-5, per-class accuracy, the confusion matrix) and confusion.png."""
    confusion = details["confusion"]
    record = {"top1": metrics["test_accuracy"], "top5": metrics["test_top5_accuracy"],
              "count": metrics["test_count"], "per_class": per_class_accuracy(confusion, classes),
              "confusion": [[int(x) for x in row] for row in confusion]}
    rundir.write_atomic(directory / "evaluation.json", json.dumps(record).encode())
    plots.confusion(confusion, classes, directory / "confusion.png",
                    title=f"top-1 {metrics['test_accuracy']:.4f}, {metrics['test_count']:,} images")


def save_final_model(job: loop.Job) -> None:
    """model/ (`loop.save_final_model`): the network with the evaluated statistics, recalibrated, its crops and
    class names."""
    cfg = job.cfg
    loop.save_final_model(job, {"variant": cfg["variant"], "num_classes": len(cfg["classes"]), "in_channels": 3,
                                "aux_logits": cfg["aux_logits"], "transform_input": cfg["transform_input"]},
                          {"image_size": cfg["image_size"], "resize_size": cfg["resize_size"],
                           "mean": list(imagenet.MEAN), "std": list(imagenet.STD), "class_names": cfg["classes"]})


# ----------------------------------------------------------------------------------------------- evaluate only


def evaluate_only(args) -> dict:
    """Top-1 / top-5 (and per-class accuracy) of --evaluate's weights on --data's held-out images; with
    --workdir also evaluation.json and confusion.png there."""
    start.start_process(args)
    cfg = make_config(args, None)
    check_sizes(cfg)
    workdir = Path(args.workdir) if args.workdir else None
    if workdir is not None and workdir.exists() and any(workdir.iterdir()):
        raise UsageError(f"--workdir {workdir} is not empty; choose a new directory for the evaluation")
    images = args.bn_recalibrate or 0  # off unless asked: the weights' own statistics
    dataset = load_data(cfg, evaluate_only=not images, max_pixels=args.max_pixels)
    try:
        from convert import load_weights

        model, variables = load_weights(args.evaluate)
    except (ValueError, OSError) as e:
        raise UsageError(f"--evaluate {args.evaluate}: {str(e).splitlines()[0]}") from None
    if model.num_classes != len(dataset.classes):
        raise UsageError(f"--evaluate {args.evaluate}: a {model.num_classes}-class model, but --data {cfg['data']} "
                         f"has {len(dataset.classes)} classes")
    mesh = start.make_mesh(args.devices, cfg["batch_size"])
    start.enable_compile_cache(args)
    state = train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=train.make_optimizer(0.0),
                                    batch_stats=variables.get("batch_stats", {}))
    options = compiler_options(cfg["image_size"], cfg["dtype"])
    inference_options = compiler_options(cfg["image_size"], cfg["dtype"], step="inference")
    eval_step = inference.jit_folded_eval_step(model, inference_options, mesh=mesh, preprocess=imagenet.normalize,
                                               num_classes=model.num_classes)
    num_workers = workers(args)
    train_batches, eval_batches = make_batches(cfg, dataset, 0, num_workers,
                                               max_resized_pixels=args.max_resized_pixels)
    evaluated = inference.Inference(
        model, image_shape=(cfg["image_size"], cfg["image_size"], model.in_channels), images=images,
        preprocess=imagenet.normalize, mesh=mesh, options=options,
        lead=jax.process_index() == 0,
        batches=functools.partial(recalibration_batches, cfg, dataset.train, train_batches.check, num_workers,
                                  max_resized_pixels=args.max_resized_pixels))
    folded_variables = evaluated(distributed.replicate(state, mesh))
    print(f"transform: Resize({cfg['resize_size']}) + CenterCrop({cfg['image_size']}) (torchvision's, on the "
          f"host); {xla_kernels(cfg['image_size'], cfg['dtype'])}", flush=True)
    lead = jax.process_index() == 0
    with progress.bar(len(dataset.val), desc="evaluating", disable=not lead) as shown:
        metrics, details = loop.evaluate_batches(eval_step, folded_variables,
                                                 counted(eval_batches(), shown), mesh)
    if workdir is not None and lead:
        workdir.mkdir(parents=True, exist_ok=True)
        write_evaluation(workdir, metrics, details, classes=dataset.classes)
        print(f"wrote {workdir}: evaluation.json, confusion.png", flush=True)
    return metrics


def counted(batches, shown):
    """`batches`, each counted on `shown` (its real rows, over all processes) as it is read."""
    for batch in batches:
        yield batch
        shown.update(int(batch["mask"].sum()) * jax.process_count())


def main(argv=None) -> int:
    # data.DataError: an unreadable image with --bad-images stop
    return cli.run_cli(lambda: work(parse_args(argv)), bad_input=(data.DataError,))


def work(args) -> str:
    """The run or the evaluation; its result line."""
    if args.evaluate:
        m = evaluate_only(args)
        return f"top1={m['test_accuracy']:.4f} top5={m['test_top5_accuracy']:.4f} ({m['test_count']:,} images)"
    return f"test_accuracy={run(args):.4f}"


if __name__ == "__main__":
    cli.exit_process(main())
