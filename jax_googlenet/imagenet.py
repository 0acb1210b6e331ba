"""ImageNet evaluation preprocessing and category names, as torchvision's GoogLeNet_Weights.IMAGENET1K_V1 has them.

`preprocess` equals `GoogLeNet_Weights.IMAGENET1K_V1.transforms()` (resize the shorter side to 256, bilinear with
antialias; center crop 224; scale to [0, 1]; normalise with the ImageNet mean and std), but returns HWC.
`normalize` is its last step alone, on the device, for uint8 crops made on the host (`jax_googlenet.data.transforms`).
"""

from __future__ import annotations

from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224


def categories() -> list[str]:
    """The 1000 ImageNet class names in the pretrained weights' order (torchvision's weights metadata)."""
    text = resources.files("jax_googlenet").joinpath("assets/imagenet_categories.txt").read_text()
    return text.splitlines()


def resized_size(height: int, width: int, size: int = RESIZE) -> tuple[int, int]:
    """torchvision's resize to an int: the shorter side becomes `size`, the longer one scales, truncated."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's center crop, whose offsets use Python's round (half to even)."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _antialiased_weights(size: int, resized: int, start: int, count: int) -> jax.Array:
    """[size, count]: the weights of jax.image.resize's antialiased linear kernel (its `compute_weight_mat`, the
    same float32 arithmetic) resizing `size` pixels to `resized`, for the outputs start .. start + count alone.
    Not jax.image.scale_and_translate with the crop as a translation: it computes the sample positions in another
    order, and 415 of 612,096 uint8 values came out one level off the whole resize's (measured)."""
    inv_scale = 1.0 / (resized / size)
    sample = (jnp.arange(start, start + count, dtype=jnp.float32) + 0.5) * inv_scale - 0.5
    distance = jnp.abs(sample[None, :] - jnp.arange(size, dtype=jnp.float32)[:, None]) / max(inv_scale, 1.0)
    weights = jnp.maximum(0, 1 - distance)
    total = jnp.sum(weights, axis=0, keepdims=True)
    weights = jnp.where(jnp.abs(total) > 1000.0 * float(np.finfo(np.float32).eps),
                        weights / jnp.where(total != 0, total, 1), 0)
    return jnp.where(((sample >= -0.5) & (sample <= size - 0.5))[None, :], weights, 0)


def resize_and_center_crop(image: jax.Array, size: int, crop: int) -> jax.Array:
    """float HWC -> crop x crop: the shorter side resized to `size` (bilinear, antialiased: jax.image.resize's
    numbers), then torchvision's centre crop. Only the crop's pixels are computed: each axis's weights are
    [input, crop] rather than [input, resized] (for a 1x20000 image resized to 16 x 320,000 those were 25.6 GB).
    Within 1e-4 of 255 of resizing whole and cropping (the products are blocked otherwise; rounded to uint8,
    0 to 2e-5 of the values go one level the other way at an exact .5, measured)."""
    height, width = image.shape[:2]
    h, w = resized_size(height, width, size)
    top, left = center_crop_offsets(h, w, crop)
    x = image if h != height else image[top:top + crop]
    x = x if w != width else x[:, left:left + crop]
    operands, out = [], [0, 1, 2]  # one einsum over both axes, as jax.image.resize contracts them
    if h != height:
        operands += [_antialiased_weights(height, h, top, crop), [0, 3]]
        out[0] = 3
    if w != width:
        operands += [_antialiased_weights(width, w, left, crop), [1, 4]]
        out[1] = 4
    if not operands:
        return x
    return jnp.einsum(x, [0, 1, 2], *operands, out, precision=jax.lax.Precision.HIGHEST)


def normalize(images: jax.Array) -> jax.Array:
    """uint8 RGB (..., 3) -> float32 scaled to [0, 1] and normalised with the ImageNet mean and std."""
    return (jnp.asarray(images, jnp.float32) / 255.0 - jnp.asarray(MEAN)) / jnp.asarray(STD)


def preprocess(image: np.ndarray, resize: int = RESIZE, crop: int = CROP) -> jax.Array:
    """A uint8 HWC RGB image -> float32 crop x crop x 3, ImageNet-normalised."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}")
    x = resize_and_center_crop(jnp.asarray(image, jnp.float32), resize, crop)
    # torchvision resizes a uint8 image to uint8: round as it does, before scaling to [0, 1].
    return normalize(jnp.clip(jnp.round(x), 0, 255))
