"""``tfds:NAME``: a TFDS image-classification dataset prepared on disk, read through `tfds.data_source` (never
downloads; community datasets, NAMESPACE:NAME, are refused); its "validation" split held out, else its "test"
split, else a seeded fraction of "train". Every image becomes RGB, grey ones repeated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jax_googlenet.data.source import DataError, ImageDataset, check_classes, decoded, hold_out


class TfdsSource:
    """A split of a TFDS dataset read through `tfds.data_source`; item i is {"image": RGB PIL image or None,
    "label", "index": i}."""

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
        try:  # TFDS decodes the image here
            record = self.source[i]
            label = np.int32(record[self.label_key])
        except Exception:  # noqa: BLE001 (as `decoded`: unreadable, reported by BadImages)
            return {"image": None, "label": np.int32(0), "index": np.int32(i)}
        return {"image": decoded(lambda: self._image(record)), "label": label, "index": np.int32(i)}


def load_tfds(name: str, *, data_dir: str | None = None, val_fraction: float | None = None,
              val_split: str | None = None, seed: int = 0, evaluate_only: bool = False) -> ImageDataset:
    """A prepared TFDS image-classification dataset; never downloads."""
    import tensorflow_datasets as tfds

    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory")
    try:
        dataset_name, _ = tfds.core.naming.parse_builder_name_kwargs(name)
    except ValueError:
        raise DataError(f"--data tfds:{name}: not a TFDS dataset name (NAME, NAME/CONFIG or NAME:VERSION)") from None
    if dataset_name.namespace:  # TFDS would fetch and run the namespace's code, which may download
        raise DataError(f"--data tfds:{name}: community datasets ({dataset_name.namespace}:...) are not read, only "
                        f"TFDS's own datasets prepared on disk; save the images as a folder and use folder:DIR")
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
    check_classes(classes, f"tfds:{name}")
    train = open_split("train")
    if val_split is not None:
        val, how = open_split(val_split), f"train / {val_split}"
    else:
        train, val, how = hold_out(train, val_fraction, seed, f"tfds:{name} train")
    return ImageDataset(f"tfds {name} {how} ({len(train):,} train / {len(val):,} held out, {len(classes)} "
                        f"classes)", classes, train, val)
