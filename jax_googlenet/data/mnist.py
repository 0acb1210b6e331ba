"""MNIST's digits as the MNIST job reads them, from any of its sources: grain batches of uint8 28x28x1 digits on
the host, resized, normalised and shifted at random on the device."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jax_googlenet.data import pipeline

MEAN, STD = 0.1307, 0.3081  # MNIST's pixel mean and std (of x / 255), the write-up's Normalize
SIDE = 28
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------- batches


def _record(r: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"image": np.asarray(r["image"], np.uint8).reshape(SIDE, SIDE, 1), "label": np.int32(r["label"])}


def train_batches(source: Sequence, *, global_batch: int, seed: int, epoch: int, start_step: int = 0,
                  num_threads: int = 4, prefetch: int = 8) -> grain.IterDataset:
    """This process's part of the epoch's global batches of digits, from step `start_step`: the order is a
    function of (seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would."""
    per_epoch = pipeline.steps_per_epoch(len(source), global_batch)
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


@functools.lru_cache(maxsize=8)
def make_preprocess(image_size: int, *, channels: int = 1):
    """uint8 NHWC 28x28 -> float32 `image_size` square, bilinear, normalised; `channels` 3 repeats the grey
    channel (for a model built for RGB, e.g. warm-started from ImageNet weights). The same arguments give the
    same function, so the steps jitted with it are kept (`jax_googlenet.train.jit_train_step`)."""

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
