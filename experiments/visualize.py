"""python -m experiments.visualize: what a trained GoogLeNet's channels and classes respond to, and which
pixels of an image a class decision rests on.

    python -m experiments.visualize --weights W --layer inception4a --channels 0-15 --out DIR
    python -m experiments.visualize --weights W --logits 0-9 --out DIR
    python -m experiments.visualize --weights W --attribute IMAGE --target K --out DIR

W is a torchvision .pth, a model directory (`python -m convert`, a job's `model/`) or a run directory of either
job (its `model/`, else its latest checkpoint and config.json); the model's image size and normalisation come with
it. A render writes one PNG per objective named after it (`inception4a_17.png`, `logit_3.png`: the image in the
model's input space before normalisation), `grid.png` and `objectives.json` (each objective's value at the start
and at the end). An attribution writes `attribution.png` (the heat map over the image), `attribution.npy` and
`attribution.json`. DIR must not exist; it appears complete or not at all. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import progress
from experiments.cli import Parser, UsageError, run_cli
from jax_googlenet import visualize as viz
from jax_googlenet.visualize import attribution
from jax_googlenet.visualize import transforms as T


# ----------------------------------------------------------------------------------------------- weights


def load(weights: str) -> tuple[Any, dict, dict]:
    """(model, variables, serving metadata: image_size, mean, std, class_names) of `--weights`."""
    from jax_googlenet import checkpoint

    path = Path(weights)
    if not path.exists():
        raise UsageError(f"--weights {weights}: no such file or directory")
    if path.is_file():
        from convert import load_weights

        model, variables = load_weights(path)  # a .pth: torchvision's pretrained GoogLeNet, ImageNet input
        return model, variables, checkpoint.default_serving({"in_channels": 3, "num_classes": model.num_classes})
    if (path / "model" / "config").is_dir():
        path = path / "model"
    if (path / "config").is_dir() and (path / "variables").is_dir():
        model, variables = checkpoint.load_model(path)
        return model, variables, checkpoint.load_serving(path)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return _load_run(path)
    raise UsageError(f"--weights {weights}: neither a .pth file, a model directory (config/ and variables/) nor a "
                     "run directory (model/, or config.json and checkpoints/)")


def _load_run(run: Path) -> tuple[Any, dict, dict]:
    """A job's run directory without model/: its config.json's network and its latest checkpoint's weights."""
    import orbax.checkpoint as ocp

    from jax_googlenet import checkpoint
    from jax_googlenet.model import googlenet

    cfg = json.loads((run / "config.json").read_text())
    config = {"variant": cfg.get("variant", "torchvision"), "in_channels": cfg.get("in_channels", 3),
              "num_classes": len(cfg["classes"]) if "classes" in cfg else 10, "aux_logits": cfg.get("aux_logits", True)}
    manager = ocp.CheckpointManager((run / "checkpoints").absolute())
    step = manager.latest_step()
    if step is None:
        raise UsageError(f"--weights {run}: the run holds no checkpoint yet")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    serving = checkpoint.default_serving(config)
    if "image_size" in cfg:
        serving["image_size"] = int(cfg["image_size"])
    print(f"{run}: checkpoint {step}, {config['variant']} variant, {config['in_channels']} channel(s)")
    return googlenet(**config), {"params": state["params"], "batch_stats": state.get("batch_stats", {})}, serving


# ----------------------------------------------------------------------------------------------- arguments


def parse_indices(text: str, limit: int, what: str) -> list[int]:
    """"0-15", "3" or "0,4,8-11" as a list of indices below `limit`; a UsageError says what is wrong."""
    out = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UsageError(f"{what} {text!r}: write indices as 0-15, 3 or 0,4,8-11") from None
    if not out:
        raise UsageError(f"{what} {text!r} selects nothing")
    bad = [i for i in out if not 0 <= i < limit]
    if bad:
        raise UsageError(f"{what} {text!r}: {bad[0]} is out of range; the model has {limit} (0-{limit - 1})")
    return out


def layer_channels(model, side: int) -> dict[str, int]:
    """Channels of each `features()` output at input side `side`."""
    x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    shapes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, method=type(model).features), v, x)
    return {k: s.shape[-1] for k, s in shapes.items()}


def read_image(path: str, side: int, channels: int) -> np.ndarray:
    """An image file as side x side x channels in [0, 1]: its shorter side resized to `side`, centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = side / min(w, h)
            im = im.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BILINEAR)
            left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
            a = np.asarray(im.crop((left, top, left + side, top + side)), np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise UsageError(f"--attribute {path}: cannot read an image ({type(e).__name__})") from None
    return a.reshape(side, side, channels)


def parse_args(argv):
    p = Parser(prog="python -m experiments.visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help=".pth, model directory or run directory")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--channels", help="channels of --layer to render, e.g. 0-15 (one image each)")
    what.add_argument("--logits", help="classes whose logit to render, e.g. 0-9 (one image each)")
    what.add_argument("--attribute", metavar="IMAGE", help="an image to attribute to class --target")
    p.add_argument("--layer", help="a features() output: stem, inception3a ... inception5b (with --channels)")
    p.add_argument("--target", type=int, help="the class of --attribute")
    p.add_argument("--method", choices=attribution.METHODS, default="integrated",
                   help="attribution method (default: integrated gradients from a black image)")
    p.add_argument("--steps", type=int, default=256, help="Adam steps of a render (default 256)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate (default 0.05)")
    p.add_argument("--size", type=int, default=None,
                   help="side of the rendered images (default: the model's image size; resampled to it)")
    p.add_argument("--param", choices=viz.param.KINDS, default="fourier", help="image parameterisation")
    p.add_argument("--no-decorrelate", action="store_true", help="plain RGB instead of Lucid's colour space")
    p.add_argument("--no-transforms", action="store_true", help="no random pad, jitter, scale and rotation")
    p.add_argument("--diversity", type=float, default=0.0, help="weight of Lucid's diversity term on --layer")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    args = p.parse_args(argv)
    if args.channels is not None and not args.layer:
        raise UsageError("--channels needs --layer (e.g. --layer inception4a)")
    if args.attribute is not None and args.target is None:
        raise UsageError("--attribute needs --target K (the class to attribute)")
    for name in ("steps", "size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be positive")
    if not args.lr > 0:
        raise UsageError("--lr must be positive")
    if Path(args.out).exists():
        raise UsageError(f"--out {args.out} already exists; remove it or choose another directory")
    return args


# ----------------------------------------------------------------------------------------------- work


def grid(images: np.ndarray) -> np.ndarray:
    """The images tiled in rows (one row of up to 10, else ceil(sqrt(n)) columns), 2 white pixels between."""
    n, h, w, c = images.shape
    cols = n if n <= 10 else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.ones((rows * (h + 2) - 2, cols * (w + 2) - 2, c), np.float32)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        out[r * (h + 2):r * (h + 2) + h, k * (w + 2):k * (w + 2) + w] = im
    return out


def _describe(t: T.Transforms) -> str:
    which = "lucent's standard" if t.pad == T.STANDARD.pad else f"small-image (below {T.SMALL_BELOW} px)"
    return (f"{which} transforms: pad {t.pad} (value {t.pad_value:g}), jitter {t.jitter}, "
            f"scale {min(t.scales):g}-{max(t.scales):g}, rotation "
            f"{min(t.angles):g} to {max(t.angles):g} degrees, jitter {t.jitter_after}")


def do_render(args, model, variables, serving, out: Path) -> str:
    side = int(serving["image_size"])
    if args.logits is not None:
        objective = viz.logit(parse_indices(args.logits, model.num_classes, "--logits"))
    else:
        channels = layer_channels(model, side)
        if args.layer not in channels:
            raise UsageError(f"--layer {args.layer}: unknown; choose one of {', '.join(channels)}")
        objective = viz.channel(args.layer, parse_indices(args.channels, channels[args.layer], "--channels"))
        if args.diversity:
            objective = objective + args.diversity * viz.diversity(args.layer)
    size = args.size or side
    # The padding takes the background's value: MNIST's black for grey models, lucent's grey for RGB ones.
    transforms = T.NONE if args.no_transforms else T.for_size(size, 0.0 if model.in_channels == 1 else 0.5)
    print(f"render: {objective.batch} image(s) of {size}x{size} ({args.param}"
          f"{', decorrelated colour' if model.in_channels == 3 and not args.no_decorrelate else ''}), the model "
          f"sees {side}x{side}; {args.steps} Adam steps at lr {args.lr:g}; "
          f"{'no transforms' if args.no_transforms else _describe(transforms)}", flush=True)
    with progress.bar(args.steps, desc="render", unit="step") as bar:
        result = viz.render(model, variables, objective, steps=args.steps, lr=args.lr,
                            key=jax.random.key(args.seed), size=size, input_size=side, kind=args.param,
                            decorrelate=not args.no_decorrelate, transforms=transforms,
                            mean=tuple(serving["mean"]), std=tuple(serving["std"]),
                            progress=lambda _: bar.update(1))
    records = []
    for name, image, start, final in zip(objective.names, result.images, result.trace[0], result.final):
        attribution.save_png(out / f"{name}.png", image)
        records.append({"name": name, "start": float(start), "final": float(final)})
    attribution.save_png(out / "grid.png", grid(result.images))
    meta = {"weights": str(args.weights), "steps": args.steps, "lr": args.lr, "size": size, "input_size": side,
            "param": args.param, "transforms": not args.no_transforms, "seed": args.seed,
            "mean": serving["mean"], "std": serving["std"], "objectives": records}
    (out / "objectives.json").write_text(json.dumps(meta, indent=1))
    return f"wrote {len(records)} image(s), grid.png and objectives.json"


def do_attribute(args, model, variables, serving, out: Path) -> str:
    if not 0 <= args.target < model.num_classes:
        raise UsageError(f"--target {args.target}: the model has {model.num_classes} classes "
                         f"(0-{model.num_classes - 1})")
    side = int(serving["image_size"])
    image = read_image(args.attribute, side, model.in_channels)[None]
    mean, std = jnp.asarray(serving["mean"]), jnp.asarray(serving["std"])
    if args.method == "gradients":
        attr = attribution.gradients(model, variables, image, args.target, mean, std)
    elif args.method == "smoothgrad":
        attr = attribution.smoothgrad(model, variables, image, args.target, jax.random.key(args.seed), mean, std)
    else:
        attr = attribution.integrated_gradients(model, variables, image, args.target, None, mean, std)
    attr = np.asarray(attr)[0]
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, (image - mean) / std))[0]
    probs = np.asarray(jax.nn.softmax(logits))
    attribution.save_png(out / "attribution.png", attribution.overlay(image[0], attr))
    np.save(out / "attribution.npy", attr)
    names = serving.get("class_names") or [str(i) for i in range(model.num_classes)]
    meta = {"weights": str(args.weights), "image": str(args.attribute), "method": args.method,
            "target": args.target, "target_name": names[args.target], "logit": float(logits[args.target]),
            "probability": float(probs[args.target]), "predicted": int(probs.argmax()),
            "attribution_sum": float(attr.sum())}
    (out / "attribution.json").write_text(json.dumps(meta, indent=1))
    return (f"wrote attribution.png ({args.method}) of class {args.target} ({names[args.target]}, p = "
            f"{probs[args.target]:.3f}); predicted {int(probs.argmax())}")


def run(argv) -> str:
    args = parse_args(argv)
    try:
        model, variables, serving = load(args.weights)
    except (ValueError, KeyError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--weights {args.weights}: cannot load ({why})") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        work = do_attribute if args.attribute is not None else do_render
        line = work(args, model, variables, serving, staging)
        os.rename(staging, out)  # the directory appears complete or not at all
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return f"{line} in {out}"


def main(argv=None) -> int:
    return run_cli(lambda: run(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
