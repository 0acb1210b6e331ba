"""python -m experiments.predict --weights FILE IMAGE...: top-5 ImageNet classes of each image.

FILE is a checkpoint directory written by `python -m convert` or a torchvision .pth state dict (converted on the
fly by `convert.load_weights`, which needs torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from convert import load_weights
from jax_googlenet.imagenet import categories, preprocess
from jax_googlenet.ops import compiler_options


def read_image(path: str | Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read an image ({type(e).__name__})") from None


def top_k(logits: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
    """[(class, probability)] of the k most probable classes of each row."""
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    order = np.argsort(-probs, axis=-1)[:, :k]
    return [[(int(c), float(p[c])) for c in row] for row, p in zip(order, probs)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.predict", description=__doc__)
    p.add_argument("--weights", required=True, help="checkpoint directory (python -m convert) or .pth file")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    args = p.parse_args(argv)
    try:
        if not Path(args.weights).exists():
            raise ValueError(f"{args.weights}: no such file or directory")
        images = np.stack([np.asarray(preprocess(read_image(f))) for f in args.images])
        model, variables = load_weights(args.weights)
        if model.num_classes != 1000:
            raise ValueError(f"{args.weights}: a {model.num_classes}-class model, not an ImageNet one")
    except (ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    names = categories()
    # One batch, one compilation, whatever the number of images.
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False),
                     compiler_options=compiler_options(images.shape[1]))(variables, images)
    for path, top in zip(args.images, top_k(np.asarray(logits))):
        print(path)
        for c, prob in top:
            print(f"  {prob:7.2%}  {names[c]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
