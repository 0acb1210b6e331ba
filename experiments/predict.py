"""python -m experiments.predict --weights W IMAGE_OR_FOLDER...: the most probable classes of each image.

W is any model the project writes: a `python -m convert` directory, a job's `model/` or run directory (its class
names, image size and normalisation come with it), a torchvision .pth state dict (converted on the fly by
`convert.load_weights`, which needs torch; ImageNet's classes), or a file `python -m experiments.export` wrote
(.onnx, run by onnxruntime; .stablehlo, run by `jax.export`). Images are resized and centre-cropped as the model
was evaluated (torchvision's transforms). A folder gives its image files, sorted, an unreadable one skipped with a
line on stderr. `--json` prints one JSON list instead of text. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cli import Parser, UsageError
from jax_googlenet.data.folder import FORMATS, IMG_EXTENSIONS, MAX_PIXELS
from jax_googlenet.data.transforms import MAX_RESIZED_PIXELS
from jax_googlenet.imagenet import resize_and_center_crop, resized_size

# The folder source's files and formats, and GIF: a file a user names is read as Pillow reads it, where a
# training folder keeps to torchvision's ImageFolder extensions.
IMAGE_SUFFIXES = (*IMG_EXTENSIONS, ".gif")
PIL_FORMATS = (*FORMATS, "GIF")


class UnreadableImage(ValueError):
    """An image that cannot be decoded or is over the size budgets."""


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """uint8 HWC (RGB, or grey for `channels` 1); UnreadableImage for anything PIL cannot decode or an image over
    MAX_PIXELS (checked from the header, before decoding)."""
    from PIL import Image

    try:  # PIL's bomb warning would be lines of its own on stderr: MAX_PIXELS below is the check
        with (warnings.catch_warnings(action="ignore", category=Image.DecompressionBombWarning),
              Image.open(path, formats=PIL_FORMATS) as im):
            if im.width * im.height > MAX_PIXELS:
                raise UnreadableImage(f"{path}: {im.width}x{im.height} is over the budget of {MAX_PIXELS:,} "
                                      "pixels an image")
            image = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except UnreadableImage:
        raise
    except Exception as e:  # any decoder error (PIL raises OSError, ValueError, SyntaxError, struct.error...)
        raise UnreadableImage(f"{path}: cannot read an image ({type(e).__name__})") from None
    return image[..., None] if image.ndim == 2 else image


def preprocess(image: np.ndarray, serving: dict[str, Any], *, uint8: bool) -> np.ndarray:
    """torchvision's eval transform as the model's serving metadata says: the shorter side resized to
    `resize_size` (bilinear, antialiased, rounded to uint8 as torchvision does), centre crop `image_size`; then
    uint8, or scaled to [0, 1] and normalised with `mean` and `std`."""
    height, width = image.shape[:2]
    h, w = resized_size(height, width, serving["resize_size"])
    if h * w > MAX_RESIZED_PIXELS:
        raise UnreadableImage(f"{width}x{height} resizes to {w}x{h}, over the budget of {MAX_RESIZED_PIXELS:,} "
                              "pixels")
    x = resize_and_center_crop(jnp.asarray(image, jnp.float32), serving["resize_size"], serving["image_size"])
    x = np.asarray(jnp.clip(jnp.round(x), 0, 255))
    if uint8:
        return x.astype(np.uint8)
    mean, std = np.asarray(serving["mean"], np.float32), np.asarray(serving["std"], np.float32)
    return ((x / 255.0 - mean) / std).astype(np.float32)


def top_k(logits: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
    """[(class, probability)] of the k most probable classes of each row."""
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(int(c), float(p[c])) for c in row] for row, p in zip(order, probs)]


def list_images(paths: list[str]) -> list[Path]:
    """The files named, and each folder's image files (by suffix, recursively, sorted); a folder is entered once
    even through links."""
    out, seen = [], set()
    for p in map(Path, paths):
        if p.is_dir():
            for root in sorted({p, *(d for d in p.rglob("*") if d.is_dir())}):
                key = (root.stat().st_dev, root.stat().st_ino)
                if key in seen:
                    continue
                seen.add(key)
                out.extend(sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise UsageError(f"{p}: no such file or directory")
    return out


def load_predictor(weights: str) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any], int, bool]:
    """(logits of a batch, serving metadata, input channels, takes uint8) for any model the project writes."""
    from jax_googlenet import export

    path = Path(weights)
    if not path.exists():
        raise UsageError(f"--weights {weights}: no such file or directory")
    if path.is_file() and export.file_format(path):
        try:
            loaded = export.load(path)
        except Exception as e:  # a damaged or foreign file: onnxruntime's and jax's errors have many types
            raise UsageError(f"--weights {weights}: not an exported model ({type(e).__name__})") from None
        serving = loaded.serving
        if not {"image_size", "resize_size", "mean", "std"} <= set(serving):
            raise UsageError(f"--weights {weights}: no serving metadata with it (written by python -m "
                             "experiments.export?)")
        return loaded, serving, loaded.input_shape[-1], loaded.input_dtype == np.uint8
    from experiments.export import read_weights

    try:
        model, variables, serving = read_weights(path)
    except ValueError as e:
        raise UsageError(f"--weights {e}") from None
    apply, folded_vars = folded_step(model, variables, serving["image_size"])
    return (lambda x: np.asarray(apply(folded_vars, x))), serving, model.in_channels, False


def folded_step(model, variables: dict[str, Any], image_size: int) -> tuple[Callable, dict[str, Any]]:
    """(jitted logits of (variables, images), the variables it takes): the folded model (`jax_googlenet.fold`),
    its BatchNorms folded into the convolutions and its kernels' weight transforms prepared once here, so the step
    computes neither."""
    from jax_googlenet import fold as fold_ops
    from jax_googlenet.fold import fold
    from jax_googlenet.ops import compiler_options

    # On the host: numpy folds without compiling an XLA kernel per operation (seconds on a small CPU).
    model, folded_vars = fold(model, jax.device_get({k: variables[k] for k in ("params", "batch_stats")
                                                     if k in variables}),
                              (image_size, image_size, model.in_channels))
    apply = jax.jit(functools.partial(fold_ops.apply, model),
                    compiler_options=compiler_options(image_size, step="inference"))
    return apply, folded_vars


def parse_args(argv):
    p = Parser(prog="python -m experiments.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True,
                   help="a model directory (python -m convert, a job's model/ or run directory), a .pth, or an "
                        "exported .onnx or .stablehlo file")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads) or folders of them")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print a JSON list: image, classes, probabilities")
    p.add_argument("--batch-size", type=int, default=16, help="images per call of the model (default 16)")
    args = p.parse_args(argv)
    for flag in ("top_k", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: choose 1 or more")
    return args


def run(args) -> list[dict[str, Any]]:
    files = list_images(args.images)
    named = {Path(p) for p in args.images}
    predict, serving, channels, uint8 = load_predictor(args.weights)
    names = serving["class_names"]
    if args.top_k > len(names):
        raise UsageError(f"--top-k {args.top_k}: the model has {len(names)} classes")
    kept, crops = [], []
    for f in files:
        try:
            image = read_image(f, channels)
            try:
                crops.append(preprocess(image, serving, uint8=uint8))
            except UnreadableImage as e:
                raise UnreadableImage(f"{f}: {e}") from None
            kept.append(f)
        except UnreadableImage as e:
            if f in named:
                raise UsageError(str(e)) from None
            print(f"skipped {e}", file=sys.stderr)
    if not kept:
        raise UsageError(f"no readable images in {' '.join(args.images)}")
    results = []
    batch = min(args.batch_size, len(crops))
    for start in range(0, len(crops), batch):
        x = np.stack(crops[start:start + batch])
        n = len(x)
        x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)])  # one shape, one compilation
        for f, top in zip(kept[start:start + n], top_k(predict(x)[:n], args.top_k)):
            results.append({"image": str(f), "top_k": [{"class": names[c], "index": c, "probability": p}
                                                        for c, p in top]})
    return results


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        results = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print(r["image"])
        for t in r["top_k"]:
            print(f"  {t['probability']:7.2%}  {t['class']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
