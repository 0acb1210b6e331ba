"""Image classification data of any size: image folders and TFDS datasets, and torchvision's transforms on the host.

Sources (`load(spec, ...)` returns an `ImageDataset` of a train and a held-out random-access source):

- ``folder:DIR``: torchvision's ImageFolder layout, one subfolder per class (sorted names give the class
  indices, the files ImageFolder reads, in its order); DIR/train and DIR/val, or DIR itself with a seeded held-out
  fraction. An ImageNet validation folder in the synset layout (n01440764/, ...) gives torchvision's class order.
- ``tfds:NAME``: a prepared TFDS image-classification dataset through `tfds.data_source` (never downloads); its
  "validation" split held out, else its "test" split, else a seeded fraction of "train".

Records are {"image": an RGB PIL image or None when unreadable, "label", "index"}. Every image becomes RGB, grey
ones repeated, as torchvision's ImageFolder loader converts them. The transforms are torchvision's on PIL images,
the backend of its reference scripts (which measured its accuracy table), call for call, so the uint8 crops are
bit-identical to torchvision's:

- training: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) and RandomHorizontalFlip;
- evaluation: Resize(resize) (the shorter side, bilinear) and CenterCrop(size).

They run on the host, in grain's worker processes; `imagenet.normalize` scales and normalises on the device. An
image that cannot be decoded becomes a blank row with mask False and its index in "bad"; `BadImages` reports each
once by path and skips it (weight 0), or stops the run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from jax_googlenet.imagenet import center_crop_offsets, resized_size

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SOURCES = ("folder:DIR", "tfds:NAME")
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults
ATTEMPTS = 10  # RandomResizedCrop's tries before its centre-crop fallback
DEFAULT_VAL_FRACTION = 0.1


class DataError(ValueError):
    """Bad or missing data; its message is one line meant for the user."""


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises on a missing, truncated or corrupt file (SyntaxError for some broken headers)."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


# ----------------------------------------------------------------------------------------------- sources


class FolderSource:
    """Image files and their labels; item i is {"image": RGB PIL image or None, "label", "index": i}."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]):
        self.paths, self.labels = list(paths), np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return image.convert("RGB")  # decodes; torchvision's pil_loader does the same

    def describe(self, i: int) -> str:
        return self.paths[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": _decoded(lambda: self.read(i)), "label": self.labels[i], "index": np.int32(i)}


class TfdsSource:
    """A split of a TFDS dataset read through `tfds.data_source`, items as `FolderSource`'s."""

    def __init__(self, name: str, split: str, source, image_key: str = "image", label_key: str = "label"):
        self.name, self.split, self.source = name, split, source
        self.image_key, self.label_key = image_key, label_key

    def __len__(self) -> int:
        return len(self.source)

    def read(self, i: int):
        return self._image(self.source[i])

    def _image(self, record):
        from PIL import Image

        array = np.asarray(record[self.image_key])
        return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).convert("RGB")

    def describe(self, i: int) -> str:
        return f"tfds:{self.name} {self.split}[{i}]"

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            record = self.source[i]
            label = np.int32(record[self.label_key])
        except _unreadable_errors():
            return {"image": None, "label": np.int32(0), "index": np.int32(i)}
        return {"image": _decoded(lambda: self._image(record)), "label": label, "index": np.int32(i)}


def _decoded(read):
    """`read()`'s RGB image, or None when the image cannot be read."""
    try:
        return read()
    except _unreadable_errors():
        return None


class Subset:
    """Items `indices` of `source`, renumbered from 0."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, i: int):
        return self.source.read(int(self.indices[i]))

    def describe(self, i: int) -> str:
        return self.source.describe(int(self.indices[i]))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.source[int(self.indices[i])], "index": np.int32(i)}


@dataclasses.dataclass
class ImageDataset:
    name: str  # what was loaded, for the log
    classes: list[str]
    train: Any  # None in an evaluation-only load
    val: Any


def load(spec: str, *, data_dir: str | None = None, val_fraction: float | None = None, val_split: str | None = None,
         seed: int = 0, evaluate_only: bool = False) -> ImageDataset:
    """The dataset named by `--data` (see the module docstring); what it chooses for the user it prints.

    Args:
      spec: "folder:DIR" or "tfds:NAME".
      data_dir: TFDS's data directory (default TFDS's own, ~/tensorflow_datasets).
      val_fraction: hold out this fraction of the training images (seeded); default: a held-out split if there
        is one, else 0.1.
      val_split: the TFDS split to evaluate on (default "validation", else "test").
      seed: the held-out fraction's seed.
      evaluate_only: only the held-out part is needed (folder: DIR/val if present, else DIR itself).

    Returns:
      An `ImageDataset`; DataError (one line) for a missing, empty or one-class dataset.
    """
    if spec.startswith("folder:"):
        return load_folder(spec[len("folder:"):], val_fraction=val_fraction, seed=seed, evaluate_only=evaluate_only)
    if spec.startswith("tfds:"):
        return load_tfds(spec[len("tfds:"):], data_dir=data_dir, val_fraction=val_fraction, val_split=val_split,
                         seed=seed, evaluate_only=evaluate_only)
    raise DataError(f"--data {spec!r}: choose one of {', '.join(SOURCES)}")


def list_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> tuple[list[str], list[str],
                                                                                       list[int]]:
    """(classes, paths, labels) as torchvision's ImageFolder finds them: class folders sorted, files walked in
    sorted order and kept by extension. `classes`: another folder's classes to label this one by."""
    root = Path(root)
    found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not found:
        raise DataError(f"{root} holds no class folders; expected torchvision's ImageFolder layout, "
                        f"{root}/<class>/<image>")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root} has classes the training images lack: {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}")
    paths, labels, empty, ignored = [], [], [], 0
    for label, name in enumerate(classes):
        if name not in found:
            continue
        before = len(paths)
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.join(folder, file))
                    labels.append(label)
                else:
                    ignored += 1
        if len(paths) == before:
            empty.append(name)
    if empty:
        raise DataError(f"{root}: class folders without images: {', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''} (images end in {', '.join(IMG_EXTENSIONS)})")
    if ignored:
        print(f"data: {root}: ignored {ignored} files that are not images ({', '.join(IMG_EXTENSIONS)})",
              flush=True)
    return list(classes), paths, labels


def load_folder(directory: str, *, val_fraction: float | None = None, seed: int = 0,
                evaluate_only: bool = False) -> ImageDataset:
    """An image folder: DIR/train and DIR/val, or DIR's class folders with a held-out fraction."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"--data folder:{directory}: no such directory")
    if evaluate_only:
        val_root = root / "val" if (root / "val").is_dir() else root
        classes, paths, labels = list_folder(val_root)
        print(f"data: evaluating on {val_root} ({len(paths):,} images, {len(classes)} classes)", flush=True)
        return ImageDataset(f"folder {val_root}", classes, None, FolderSource(paths, labels))
    train_root = root / "train" if (root / "train").is_dir() else root
    classes, paths, labels = list_folder(train_root)
    _check_classes(classes, f"folder:{directory}")
    train = FolderSource(paths, labels)
    if (root / "val").is_dir() and val_fraction is None:
        _, val_paths, val_labels = list_folder(root / "val", classes)
        val = FolderSource(val_paths, val_labels)
        how = f"{train_root} / {root / 'val'}"
    else:
        train, val, how = _hold_out(train, val_fraction, seed, str(train_root))
    return ImageDataset(f"folder {how} ({len(train):,} train / {len(val):,} held out, {len(classes)} classes)",
                        classes, train, val)


def load_tfds(name: str, *, data_dir: str | None = None, val_fraction: float | None = None,
              val_split: str | None = None, seed: int = 0, evaluate_only: bool = False) -> ImageDataset:
    """A prepared TFDS image-classification dataset; never downloads."""
    import tensorflow_datasets as tfds

    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"--data tfds:{name}: TFDS has no dataset of that name") from None
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    feature = builder.info.features[label_key] if label_key in builder.info.features else None
    if not isinstance(feature, tfds.features.ClassLabel) or image_key not in builder.info.features:
        raise DataError(f"tfds:{name} is not an image classification dataset (no image and class label)")
    classes = list(feature.names)
    known = list(builder.info.splits)  # empty when not prepared (and under tfds.testing.mock_data)

    def open_split(split: str) -> TfdsSource:
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except (KeyError, FileNotFoundError, NotImplementedError, AssertionError, ValueError) as e:
            raise DataError(f"tfds:{name} split {split!r} is not prepared as array_record in "
                            f"{data_dir or tfds.core.constants.DATA_DIR} ({type(e).__name__}); prepare it where the "
                            f"network is: tfds build {name} --file_format=array_record (needs TensorFlow)") from None
        return TfdsSource(name, split, source, image_key, label_key)

    if val_split is None and (val_fraction is None or evaluate_only):
        candidates = [s for s in ("validation", "test") if not known or s in known]
        val_split = candidates[0] if candidates else None
        if val_split is not None:
            print(f"data: tfds:{name}: evaluating on its {val_split!r} split (--val-split chooses another)",
                  flush=True)
    if evaluate_only:
        if val_split is None:
            raise DataError(f"tfds:{name} has no validation or test split (its splits: {', '.join(known)}); "
                            f"name the one to evaluate with --val-split")
        val = open_split(val_split)
        return ImageDataset(f"tfds {name} {val.split} ({len(val):,} images, {len(classes)} classes)", classes,
                            None, val)
    _check_classes(classes, f"tfds:{name}")
    train = open_split("train")
    if val_split is not None:
        val, how = open_split(val_split), f"train / {val_split}"
    else:
        train, val, how = _hold_out(train, val_fraction, seed, f"tfds:{name} train")
    return ImageDataset(f"tfds {name} {how} ({len(train):,} train / {len(val):,} held out, {len(classes)} "
                        f"classes)", classes, train, val)


def _check_classes(classes: Sequence[str], what: str) -> None:
    if len(classes) < 2:
        raise DataError(f"{what} has {len(classes)} class ({', '.join(classes)}); a classifier needs at least 2 "
                        f"(one folder per class)")


def _hold_out(source, fraction: float | None, seed: int, what: str):
    """(train, held-out, description): a seeded random `fraction` of `source` held out."""
    if fraction is None:
        fraction = DEFAULT_VAL_FRACTION
        print(f"data: {what} has no held-out split: holding out {fraction:g} of it (--val-fraction {fraction:g}, "
              f"--seed {seed})", flush=True)
    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction {fraction:g}: choose a fraction between 0 and 1")
    n = len(source)
    held = round(n * fraction)
    if held == 0 or held == n:
        raise DataError(f"--val-fraction {fraction:g} of {what}'s {n} images holds out {held}; choose a fraction "
                        f"that leaves images on both sides")
    order = np.random.default_rng(seed).permutation(n)
    return (Subset(source, np.sort(order[held:])), Subset(source, np.sort(order[:held])),
            f"{what}, {fraction:g} held out (seed {seed})")


# ----------------------------------------------------------------------------------------------- transforms


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


def eval_transform(record: dict[str, Any], *, size: int, resize_to: int) -> dict[str, np.ndarray]:
    """Resize(resize_to) and CenterCrop(size) -> uint8 size x size x 3."""
    if record["image"] is None:
        return _unreadable(record, size)
    return _row(np.asarray(center_crop(resize(record["image"], resize_to), size)), record)


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
    (skipped: its row has mask False), or raising DataError at the first one when `stop`."""

    def __init__(self, source, *, stop: bool):
        self.source, self.stop, self.seen = source, stop, set()

    def __call__(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for batch in batches:
            batch = dict(batch)
            for i in np.unique(batch.pop("bad")):
                if i >= 0 and int(i) not in self.seen:
                    self.seen.add(int(i))
                    self.report(int(i))
            yield batch

    def report(self, i: int) -> None:
        try:
            self.source.read(i)
            why = "unreadable"
        except _unreadable_errors() as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
        where = self.source.describe(i)
        if self.stop:
            raise DataError(f"{where}: cannot read the image ({why}); fix or remove it, or pass --bad-images skip")
        print(f"warning: {where}: cannot read the image ({why}); skipped", file=sys.stderr, flush=True)
