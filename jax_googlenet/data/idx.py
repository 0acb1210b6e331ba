"""``idx:DIR``: MNIST from its four IDX files, gzipped or not (torchvision's ``MNIST/raw`` folder works)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from jax_googlenet.data.mnist import NUM_CLASSES, SIDE
from jax_googlenet.data.source import ArraySource, DataError, Dataset

IDX_FILES = {  # split -> (images, labels), the names MNIST is distributed under
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # ndim -> magic: unsigned bytes, 3-d images or 1-d labels
DEFLATE_MAX_RATIO = 1032  # the most a deflate stream expands (zlib's technical details)
CHUNK = 1 << 20  # bytes decompressed at a time


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
    """An IDX file of unsigned bytes with `ndim` dimensions, every header field and length checked; a gzipped
    one is decompressed as it is read and no further than its header declares, plus one byte."""
    gz = path.suffix == ".gz"
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            header = 4 + 4 * ndim
            head = f.read(header)
            if len(head) < header:
                raise DataError(f"{path}: truncated header ({len(head)} bytes)")
            magic, *dims = struct.unpack(f">{1 + ndim}I", head)
            if magic != IDX_MAGIC[ndim]:
                kind = "image" if ndim == 3 else "label"
                raise DataError(f"{path}: magic number {magic:#010x} is not that of an IDX {kind} file "
                                f"({IDX_MAGIC[ndim]:#010x})")
            expected = math.prod(dims)  # Python integers: 2^32-1 cubed does not wrap
            says = f"header says {' x '.join(map(str, dims))} = {expected} bytes"
            size = path.stat().st_size
            room = size * DEFLATE_MAX_RATIO if gz else size - header  # the most the payload can be
            if expected > room:
                has = f"its {size} compressed bytes hold at most {room}" if gz else f"file has {room}"
                raise DataError(f"{path}: truncated: {says}, {has}")
            payload = _read_at_most(f, expected + 1)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(payload) != expected:
        what = "truncated" if len(payload) < expected else "longer than its header says"
        has = room if not gz else len(payload) if len(payload) < expected else "more"
        raise DataError(f"{path}: {what}: {says}, file has {has}")
    return np.frombuffer(payload, np.uint8).reshape(dims)


def _read_at_most(f, limit: int) -> bytes:
    """Up to `limit` bytes of `f`, read in chunks so that memory follows what the file holds, not `limit`."""
    chunks, left = [], limit
    while left:
        chunk = f.read(min(left, CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write uint8 `array` as an IDX file (gzipped when `path` ends in .gz); the inverse of `read_idx`."""
    array = np.ascontiguousarray(array, np.uint8)
    raw = struct.pack(f">{1 + array.ndim}I", IDX_MAGIC[array.ndim], *array.shape) + array.tobytes()
    Path(path).write_bytes(gzip.compress(raw, mtime=0) if str(path).endswith(".gz") else raw)
