"""``folder:DIR``: torchvision's ImageFolder layout, one subfolder per class.

Sorted folder names give the class indices, and the files are the ones ImageFolder reads, in its order (but a
folder reached again through a link is read once); DIR/train and DIR/val, or DIR itself with a seeded held-out
fraction. An ImageNet validation folder in the synset layout (n01440764/, ...) gives torchvision's class order.
Every image becomes RGB, grey ones repeated, as torchvision's ImageFolder loader converts them. A file is decoded
only as one of the listed formats and only when its header gives at most `max_pixels` pixels; else, or when its
decoder fails in any way, it is unreadable (reported and skipped, see `transforms.BadImages`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jax_googlenet.data.source import DataError, ImageDataset, check_classes, decoded, hold_out

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
# PIL's names for those formats (a .pgm is PPM's): PIL decodes only these, never by content alone (an EPS file
# named .jpg would run Ghostscript).
FORMATS = ("BMP", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
MAX_PIXELS = 89_478_485  # decoded pixels per image: PIL's Image.MAX_IMAGE_PIXELS, where PIL warns of a bomb


class FolderSource:
    """Image files and their labels; item i is {"image": RGB PIL image or None, "label", "index": i}. An image
    whose header gives more than `max_pixels` pixels is not decoded (it is unreadable)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], max_pixels: int = MAX_PIXELS):
        self.paths, self.labels, self.max_pixels = list(paths), np.asarray(labels, np.int32), max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int):
        from PIL import Image

        if self.max_pixels > (Image.MAX_IMAGE_PIXELS or self.max_pixels):
            # A raised budget rules: PIL's own check (in Image.open) refuses twice its limit.
            Image.MAX_IMAGE_PIXELS = self.max_pixels
        with Image.open(self.paths[i], formats=FORMATS) as image:  # reads the header alone
            if image.width * image.height > self.max_pixels:
                raise DataError(f"{image.width}x{image.height} = {image.width * image.height:,} pixels, more than "
                                f"the budget of {self.max_pixels:,} decoded pixels an image (the fine-tune job's "
                                f"--max-pixels raises it)")
            return image.convert("RGB")  # decodes; torchvision's pil_loader does the same

    def describe(self, i: int) -> str:
        return self.paths[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": decoded(lambda: self.read(i)), "label": self.labels[i], "index": np.int32(i)}


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
        for folder, files in _walk(root / name):
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


def _walk(top: Path) -> list[tuple[str, list[str]]]:
    """(folder, file names) of `top` and the folders under it, links followed, sorted by path as
    `sorted(os.walk(top, followlinks=True))`; a folder reached again (by device and inode), as through a link
    to a parent, is walked once, where its sorted walk meets it first."""
    seen, found = set(), []
    for folder, dirs, files in os.walk(top, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        found.append((folder, files))
    return sorted(found)


def load_folder(directory: str, *, val_fraction: float | None = None, seed: int = 0, evaluate_only: bool = False,
                max_pixels: int = MAX_PIXELS) -> ImageDataset:
    """An image folder: DIR/train and DIR/val, or DIR's class folders with a held-out fraction; only the
    held-out part when `evaluate_only` (DIR/val if present, else DIR itself)."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"--data folder:{directory}: no such directory")
    if evaluate_only:
        val_root = root / "val" if (root / "val").is_dir() else root
        classes, paths, labels = list_folder(val_root)
        print(f"data: evaluating on {val_root} ({len(paths):,} images, {len(classes)} classes)", flush=True)
        return ImageDataset(f"folder {val_root}", classes, None, FolderSource(paths, labels, max_pixels))
    train_root = root / "train" if (root / "train").is_dir() else root
    classes, paths, labels = list_folder(train_root)
    check_classes(classes, f"folder:{directory}")
    train = FolderSource(paths, labels, max_pixels)
    if (root / "val").is_dir() and val_fraction is None:
        _, val_paths, val_labels = list_folder(root / "val", classes)
        val = FolderSource(val_paths, val_labels, max_pixels)
        how = f"{train_root} / {root / 'val'}"
    else:
        train, val, how = hold_out(train, val_fraction, seed, str(train_root))
    return ImageDataset(f"folder {how} ({len(train):,} train / {len(val):,} held out, {len(classes)} classes)",
                        classes, train, val)
