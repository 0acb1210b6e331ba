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


def normalize(images: jax.Array) -> jax.Array:
    """uint8 RGB (..., 3) -> float32 scaled to [0, 1] and normalised with the ImageNet mean and std."""
    return (jnp.asarray(images, jnp.float32) / 255.0 - jnp.asarray(MEAN)) / jnp.asarray(STD)


def preprocess(image: np.ndarray, resize: int = RESIZE, crop: int = CROP) -> jax.Array:
    """A uint8 HWC RGB image -> float32 crop x crop x 3, ImageNet-normalised."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}")
    h, w = resized_size(*image.shape[:2], resize)
    x = jax.image.resize(jnp.asarray(image, jnp.float32), (h, w, 3), method="linear", antialias=True)
    # torchvision resizes a uint8 image to uint8: round as it does, before scaling to [0, 1].
    x = jnp.clip(jnp.round(x), 0, 255)
    top, left = center_crop_offsets(h, w, crop)
    return normalize(x[top:top + crop, left:left + crop])
