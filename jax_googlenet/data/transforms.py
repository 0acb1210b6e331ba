"""torchvision's transforms on the host, for the image sources' records {"image": RGB PIL image or None, "label",
"index"}.

They are torchvision's on PIL images, the backend of its reference scripts (which measured its accuracy table),
call for call, so the uint8 crops are bit-identical to torchvision's:

- training: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) and RandomHorizontalFlip;
- evaluation: Resize(resize) (the shorter side, bilinear) and CenterCrop(size).

They run in grain's worker processes; `imagenet.normalize` scales and normalises on the device. An image that
cannot be decoded becomes a row with mask False and its index in "bad"; `BadImages` reports each once by path and
skips it (weight 0, its row refilled with a readable image of the batch), or stops the run. Memory follows the
crops: an evaluation resize larger than `MAX_RESIZED_PIXELS` is made for the crop's region alone.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Iterator

import numpy as np

from jax_googlenet.data.source import DataError
from jax_googlenet.imagenet import center_crop_offsets, resized_size

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults
ATTEMPTS = 10  # RandomResizedCrop's tries before its centre-crop fallback
# The largest Resize the evaluation makes whole (bit-identical to torchvision's): 48 MiB as RGB, an aspect ratio
# of 256:1 at Resize(256). A 1x20000 image would resize to 256 x 5,120,000 (3.9 GB).
MAX_RESIZED_PIXELS = 1 << 24


def resize(image, size: int):
    """torchvision's Resize(size) on a PIL image: the shorter side to `size`, bilinear (PIL antialiases)."""
    from PIL import Image

    h, w = resized_size(image.height, image.width, size)
    if (h, w) == (image.height, image.width):
        return image
    return image.resize((w, h), Image.BILINEAR)


def center_crop(image, size: int):
    """torchvision's CenterCrop(size) on a PIL image at least `size` on each side."""
    top, left = center_crop_offsets(image.height, image.width, size)
    return image.crop((left, top, left + size, top + size))


def resized_center_crop(image, size: int, resize_to: int):
    """CenterCrop(size) of Resize(resize_to), resizing only the region the crop keeps (PIL's box=), so memory
    follows the crop whatever the image's shape. PIL then takes the filter centres from the box, not the whole
    image: equal weights up to float rounding, so a value may round to the next uint8 level (measured: one level at
    most, on up to 4e-4 of the values of a 224 crop of skimage's photos, and over 300 random shapes and crops)."""
    from PIL import Image

    h, w = resized_size(image.height, image.width, resize_to)
    top, left = center_crop_offsets(h, w, size)
    sx, sy = image.width / w, image.height / h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return image.resize((size, size), Image.BILINEAR, box=box)


def random_resized_crop_box(height: int, width: int, rng, scale: tuple[float, float] = SCALE,
                            ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws it, with `rng`'s draws
    (`uniform(lo, hi)`, `integers(lo, hi)`) in the place of torch's."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback to a central crop, clamped to the ratio range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image, size: int, rng, scale: tuple[float, float] = SCALE,
                        ratio: tuple[float, float] = RATIO):
    """torchvision's RandomResizedCrop(size) on a PIL image: crop the drawn box, resize it to size x size."""
    from PIL import Image

    top, left, h, w = random_resized_crop_box(image.height, image.width, rng, scale, ratio)
    return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)


def train_transform(record: dict[str, Any], rng: np.random.Generator, *, size: int,
                    scale: tuple[float, float] = SCALE, hflip: float = 0.5) -> dict[str, np.ndarray]:
    """RandomResizedCrop(size, scale) and a horizontal flip with probability `hflip` -> uint8 size x size x 3."""
    if record["image"] is None:
        return _unreadable(record, size)
    image = np.asarray(random_resized_crop(record["image"], size, rng, scale))
    if rng.random() < hflip:
        image = image[:, ::-1]
    return _row(np.ascontiguousarray(image), record)


def eval_transform(record: dict[str, Any], *, size: int, resize_to: int,
                   max_resized_pixels: int = MAX_RESIZED_PIXELS) -> dict[str, np.ndarray]:
    """Resize(resize_to) and CenterCrop(size) -> uint8 size x size x 3; beyond `max_resized_pixels` in the
    resized image, only the region the crop keeps is resized (`resized_center_crop`)."""
    image = record["image"]
    if image is None:
        return _unreadable(record, size)
    h, w = resized_size(image.height, image.width, resize_to)
    if h * w > max_resized_pixels:
        return _row(np.asarray(resized_center_crop(image, size, resize_to)), record)
    return _row(np.asarray(center_crop(resize(image, resize_to), size)), record)


def blank(size: int) -> dict[str, np.ndarray]:
    """A padding row's image, label and `bad` (no image)."""
    return {"image": np.zeros((size, size, 3), np.uint8), "label": np.int32(0), "bad": np.int32(-1)}


def _row(image: np.ndarray, record: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"image": image, "label": np.int32(record["label"]), "mask": np.bool_(True), "bad": np.int32(-1)}


def _unreadable(record: dict[str, Any], size: int) -> dict[str, np.ndarray]:
    return {**blank(size), "label": np.int32(record["label"]), "mask": np.bool_(False),
            "bad": np.int32(record["index"])}


# ----------------------------------------------------------------------------------------------- unreadable images


class BadImages:
    """Passes batches through without their "bad" column, reporting each unreadable image once by path on stderr
    and skipping it, or raising DataError at the first one when `stop`. A skipped row keeps mask False (no weight
    in the loss) and takes the image of a readable row of its batch, so that a blank does not pull the batch's
    BatchNorm statistics towards zero."""

    def __init__(self, source, *, stop: bool):
        self.source, self.stop, self.seen = source, stop, set()

    def __call__(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for batch in batches:
            batch = dict(batch)
            bad = batch.pop("bad")
            for i in np.unique(bad):
                if i >= 0 and int(i) not in self.seen:
                    self.seen.add(int(i))
                    self.report(int(i))
            skipped, readable = np.flatnonzero(bad >= 0), np.flatnonzero(batch["mask"])
            if len(skipped) and len(readable):
                image = batch["image"].copy()
                image[skipped] = image[readable[np.arange(len(skipped)) % len(readable)]]
                batch["image"] = image
            yield batch

    def report(self, i: int) -> None:
        try:
            self.source.read(i)
            why = "unreadable"
        except Exception as e:  # noqa: BLE001 (whatever made the image unreadable, named for the user)
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
        where = self.source.describe(i)
        if self.stop:
            raise DataError(f"{where}: cannot read the image ({why}); fix or remove it, or pass --bad-images skip")
        print(f"warning: {where}: cannot read the image ({why}); skipped", file=sys.stderr, flush=True)
