"""Random transforms applied to the images at each optimisation step, so a render must work under small
translations, scalings and rotations (Lucid's "transformation robustness") instead of exploiting single pixels.

lucent's `standard_transforms` are five sequential resamplings (pad, jitter, scale, rotate, jitter) followed by a
resize to the model's input size. Here they are one affine map per image, composed from the same random draws and
sampled once (bilinear, zero outside the padded canvas): one gather instead of five image passes. The scale zooms
about the centre (Lucid's meaning; lucent's resize after a larger scale undoes its zoom).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates


@dataclasses.dataclass(frozen=True)
class Transforms:
    """Random transforms drawn per image and step; `STANDARD` holds lucent's `standard_transforms`."""

    pad: int = 0  # pixels of `pad_value` around the image
    pad_value: float = 0.5
    jitter: int = 0  # a translation by 0 .. jitter - 1 pixels in each direction, before the scale
    scales: tuple[float, ...] = (1.0,)
    angles: tuple[float, ...] = (0.0,)  # degrees
    jitter_after: int = 0  # a second translation, after the rotation

    @property
    def active(self) -> bool:
        return bool(self.pad or self.jitter > 1 or self.jitter_after > 1 or set(self.scales) != {1.0}
                    or set(self.angles) != {0.0})


NONE = Transforms()
STANDARD = Transforms(pad=12, pad_value=0.5, jitter=8, scales=tuple(1 + (i - 5) / 50.0 for i in range(11)),
                      angles=tuple(float(a) for a in range(-10, 11)) + (0.0,) * 5, jitter_after=4)
# For small images (the 32-pixel MNIST digits): a third of STANDARD's padding, translations of 0-2 and 0-1 pixels
# and half its scale steps. With these, 256 steps of a digit's logit on the MNIST model render images that a
# model trained with another seed classifies as that digit (tests/test_visualize.py); STANDARD's 12 pixels of
# padding leave a digit a third of the canvas and most renders do not transfer.
SMALL = Transforms(pad=2, pad_value=0.5, jitter=3, scales=(0.9, 0.95, 1.0, 1.05, 1.1),
                   angles=tuple(float(a) for a in range(-10, 11)), jitter_after=2)
SMALL_BELOW = 96  # image sides below this get SMALL


def for_size(size: int, pad_value: float = 0.5) -> Transforms:
    """STANDARD, or SMALL for images smaller than SMALL_BELOW pixels; `pad_value` fills the padding (the
    background: 0.5 grey for photographs as in lucent, 0 for MNIST's black)."""
    return dataclasses.replace(STANDARD if size >= SMALL_BELOW else SMALL, pad_value=pad_value)


def _shift(key: jax.Array, d: int) -> jax.Array:
    return jax.random.randint(key, (2,), 0, d).astype(jnp.float32) if d > 1 else jnp.zeros(2)


def _source_coordinates(t: Transforms, key: jax.Array, canvas: int, out: int) -> jax.Array:
    """For each output pixel (out x out), its (row, column) in the padded canvas: the inverse of
    jitter -> scale -> rotate -> jitter -> resize to `out`."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    t1, t2 = _shift(k1, t.jitter), _shift(k4, t.jitter_after)
    scale = jax.random.choice(k2, jnp.asarray(t.scales, jnp.float32))
    angle = jnp.deg2rad(jax.random.choice(k3, jnp.asarray(t.angles, jnp.float32)))
    centre = (canvas - 1) / 2.0
    grid = jnp.arange(out, dtype=jnp.float32) * ((canvas - 1) / max(out - 1, 1))
    q = jnp.stack(jnp.meshgrid(grid, grid, indexing="ij"))  # 2 x out x out, (row, col) in the canvas
    q = q - t2[:, None, None] - centre
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # Undo a rotation by `angle` (counter-clockwise on screen, rows pointing down).
    q = jnp.stack([cos * q[0] - sin * q[1], sin * q[0] + cos * q[1]])
    return q / scale + centre - t1[:, None, None]


def apply(t: Transforms, key: jax.Array, images: jax.Array, out: int) -> jax.Array:
    """`images` (N x H x W x C) transformed, each with its own draw, and resampled to N x out x out x C."""
    n, h, w, c = images.shape
    if not t.active:
        if (h, w) == (out, out):
            return images
        return jax.image.resize(images, (n, out, out, c), "bilinear")
    canvas = jnp.pad(images, ((0, 0), (t.pad, t.pad), (t.pad, t.pad), (0, 0)), constant_values=t.pad_value)

    def one(image, k):
        rows, cols = _source_coordinates(t, k, h + 2 * t.pad, out)

        def sample(ch):
            return map_coordinates(ch, [rows, cols], order=1, mode="constant", cval=0.0)

        return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)

    return jax.vmap(one)(canvas, jax.random.split(key, n))
