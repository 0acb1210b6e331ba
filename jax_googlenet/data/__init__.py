"""The jobs' data: every `--data` source, registered by scheme below, torchvision's transforms and the grain
pipelines.

The MNIST job (`load_mnist`, a `Dataset` of a "train" and a "test" random-access source of uint8 28x28x1 digits):

- ``auto``: tfds when MNIST is prepared in the data dir, or when TensorFlow is installed and the network answers
  within 2 s; else the sample (`mnist_tfds`).
- ``tfds``: full MNIST through `tfds.data_source` (`mnist_tfds`).
- ``sample``: 5,000 real MNIST digits shipped in the package, 1,000 of them held out (`sample`).
- ``idx:DIR``: the four standard IDX files, gzipped or not (`idx`).

The fine-tune job (`load_images`, an `ImageDataset` of class names, a train and a held-out source of RGB PIL
images):

- ``folder:DIR``: torchvision's ImageFolder layout (`folder`).
- ``tfds:NAME``: a prepared TFDS image-classification dataset, never downloaded (`tfds_images`).

A new source is a module with its loader and one line in `MNIST_SOURCES` or `IMAGE_SOURCES`. Around the sources:
`source` (`DataError`, the source and dataset types), `mnist` (the digits' batches, resized and normalised on the
device), `transforms` (torchvision's, on the host), `pipeline` (grain: seeded, resumable, per-process batches).
Each process reads only its 1/process_count of every global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from jax_googlenet.data import folder, idx, mnist_tfds, pipeline, sample, tfds_images
from jax_googlenet.data.folder import FolderSource, list_folder
from jax_googlenet.data.idx import IDX_FILES, load_idx, read_idx, write_idx
from jax_googlenet.data.mnist import (MEAN, NUM_CLASSES, SIDE, STD, eval_batches, make_preprocess, random_shift,
                                      train_batches)
from jax_googlenet.data.pipeline import steps_per_epoch
from jax_googlenet.data.sample import SAMPLE_PATH, load_sample
from jax_googlenet.data.source import ArraySource, DataError, Dataset, ImageDataset, Subset
from jax_googlenet.data.transforms import BadImages, blank, eval_transform, train_transform

# Each job's --data sources by scheme: "name" is spelled alone, "name:ARG" passes the text after the colon as ARG.
# An MNIST loader takes (ARG, data_dir); an image loader (ARG, *, data_dir, val_fraction, val_split, seed,
# evaluate_only, max_pixels), as `load_images` passes them.
MNIST_SOURCES: dict[str, Callable[..., Dataset]] = {
    "auto": lambda _, data_dir: mnist_tfds.load_auto(data_dir),
    "tfds": lambda _, data_dir: mnist_tfds.load_tfds(data_dir),
    "sample": lambda _, data_dir: sample.load_sample(),
    "idx:DIR": lambda directory, _: idx.load_idx(directory),
}
IMAGE_SOURCES: dict[str, Callable[..., ImageDataset]] = {
    "folder:DIR": lambda directory, *, data_dir, val_split, **kw: folder.load_folder(directory, **kw),
    "tfds:NAME": lambda name, *, max_pixels, **kw: tfds_images.load_tfds(name, **kw),
}


def load_mnist(spec: str, data_dir: str | None = None) -> Dataset:
    """MNIST from `--data` SPEC, one of `MNIST_SOURCES`; `auto` prints what it chose and why.

    Args:
      spec: "auto", "tfds", "sample" or "idx:DIR".
      data_dir: TFDS's data directory (default TFDS's own, ~/tensorflow_datasets).

    Returns:
      A `Dataset`; DataError (one line) for a missing or corrupt dataset.
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory")
    loader, arg = _source(spec, MNIST_SOURCES)
    return loader(arg, data_dir)


def load_images(spec: str, *, data_dir: str | None = None, val_fraction: float | None = None,
                val_split: str | None = None, seed: int = 0, evaluate_only: bool = False,
                max_pixels: int = folder.MAX_PIXELS) -> ImageDataset:
    """The image dataset of `--data` SPEC, one of `IMAGE_SOURCES`; what it chooses for the user it prints.

    Args:
      spec: "folder:DIR" or "tfds:NAME".
      data_dir: TFDS's data directory (default TFDS's own, ~/tensorflow_datasets).
      val_fraction: hold out this fraction of the training images (seeded); default: a held-out split if there
        is one, else 0.1.
      val_split: the TFDS split to evaluate on (default "validation", else "test").
      seed: the held-out fraction's seed.
      evaluate_only: only the held-out part is needed (folder: DIR/val if present, else DIR itself).
      max_pixels: the most pixels an image file may decode to (read from its header first); a larger one is
        unreadable (reported and skipped). TFDS decodes its images itself.

    Returns:
      An `ImageDataset`; DataError (one line) for a missing, empty or one-class dataset.
    """
    loader, arg = _source(spec, IMAGE_SOURCES)
    return loader(arg, data_dir=data_dir, val_fraction=val_fraction, val_split=val_split, seed=seed,
                  evaluate_only=evaluate_only, max_pixels=max_pixels)


def _source(spec: str, sources: dict[str, Callable]) -> tuple[Callable, str]:
    """(loader, ARG) of `spec` in `sources`; DataError naming the choices when it is none of them."""
    for scheme, loader in sources.items():
        name, takes_arg, _ = scheme.partition(":")
        if spec == name and not takes_arg:
            return loader, ""
        if takes_arg and spec.startswith(f"{name}:"):
            return loader, spec[len(name) + 1:]
    raise DataError(f"--data {spec!r}: choose one of {', '.join(sources)}")
