"""What every source gives the jobs: random-access sources of records, the datasets they form, seeded held-out
fractions, and `DataError`, the one error of a bad or missing dataset."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

DEFAULT_VAL_FRACTION = 0.1


class DataError(ValueError):
    """Bad or missing data; its message is one line meant for the user."""


class ArraySource:
    """A random-access source of {"image": uint8 HxWx1, "label": int32} records over in-memory arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


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
class Dataset:
    """MNIST's two splits."""

    name: str  # what was loaded, for the log: "sample (4,000 train / 1,000 held-out digits)"
    train: Sequence[dict[str, Any]]
    test: Sequence[dict[str, Any]]


@dataclasses.dataclass
class ImageDataset:
    """An image-classification dataset: its class names, a training and a held-out source."""

    name: str  # what was loaded, for the log
    classes: list[str]
    train: Any  # None in an evaluation-only load
    val: Any


def check_classes(classes: Sequence[str], what: str) -> None:
    """DataError unless there are at least two classes."""
    if len(classes) < 2:
        raise DataError(f"{what} has {len(classes)} class ({', '.join(classes)}); a classifier needs at least 2 "
                        f"(one folder per class)")


def hold_out(source, fraction: float | None, seed: int, what: str):
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


# ----------------------------------------------------------------------------------------------- unreadable images


def decoded(read):
    """`read()`'s RGB image, or None when the image cannot be read: whatever a decoder raises (mutated files
    make PIL's raise TypeError, OverflowError or struct.error as well as OSError)."""
    try:
        return read()
    except Exception:  # noqa: BLE001 (a decoder's failure is a property of the file, reported by BadImages)
        return None
