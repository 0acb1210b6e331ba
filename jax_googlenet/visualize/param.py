"""Image parameterisations: what the optimiser changes, and how it becomes an image in [0, 1].

As in Lucid (tensorflow/lucid, `optvis/param`) and its PyTorch port lucent: an image is either its pixels or its
2-D Fourier spectrum scaled by 1/f (so every frequency starts with the same energy in the image and gradient
steps do not favour high frequencies), optionally in Lucid's decorrelated colour space (a 3x3 matrix, the square
root of ImageNet's colour covariance), and squashed to [0, 1] by a sigmoid. Grey models get one channel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Lucid's square root of ImageNet's colour correlation (from its SVD), columns normalised by the largest column
# norm: `color_correlation_normalized` in lucid/optvis/param/color.py.
COLOR_CORRELATION_SVD_SQRT = np.array([[0.26, 0.09, 0.02],
                                       [0.27, 0.00, -0.05],
                                       [0.27, -0.09, 0.03]], np.float32)
COLOR_MATRIX = COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0))
# Lucid divides the Fourier image by 4: "increasing this seems to reduce saturation".
FOURIER_DIVISOR = 4.0
KINDS = ("fourier", "pixels")


def rfft2d_freqs(h: int, w: int) -> np.ndarray:
    """Frequency magnitude of each entry of a real 2-D FFT of an h x w image (h x (w // 2 + 1), one column more
    for odd w, which the inverse transform drops)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[: w // 2 + 1 + w % 2]
    return np.sqrt(fx * fx + fy * fy)


def fourier_scale(h: int, w: int, decay_power: float = 1.0) -> np.ndarray:
    """Lucid's 1/f spectrum scaling, the lowest frequency clipped to 1 / max(h, w)."""
    return (1.0 / np.maximum(rfft2d_freqs(h, w), 1.0 / max(h, w)) ** decay_power).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ImageParam:
    """How `batch` images of `size` x `size` x `channels` are parameterised.

    kind: "fourier" (Lucid's 1/f-scaled spectrum) or "pixels"; decorrelate: Lucid's colour space (3 channels
    only); sd: standard deviation of the random initial parameters (Lucid's 0.01).
    """

    size: int
    channels: int = 3
    batch: int = 1
    kind: str = "fourier"
    decorrelate: bool = True
    sd: float = 0.01
    decay_power: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown parameterisation {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.decorrelate and self.channels != 3:
            object.__setattr__(self, "decorrelate", False)  # one grey channel has no colour to decorrelate

    def init(self, key: jax.Array) -> jax.Array:
        """Random initial parameters: N x C x H x (W // 2 + 1) x 2 (real, imaginary) or N x H x W x C pixels."""
        n, c, s = self.batch, self.channels, self.size
        shape = (n, c) + rfft2d_freqs(s, s).shape + (2,) if self.kind == "fourier" else (n, s, s, c)
        return self.sd * jax.random.normal(key, shape, jnp.float32)

    def linear(self, params: jax.Array) -> jax.Array:
        """The image before the sigmoid, N x H x W x C (in the decorrelated space's RGB when decorrelated)."""
        if self.kind == "fourier":
            s = self.size
            spectrum = jax.lax.complex(params[..., 0], params[..., 1]) * fourier_scale(s, s, self.decay_power)
            x = jnp.fft.irfftn(spectrum, s=(s, s), axes=(-2, -1), norm="ortho") / FOURIER_DIVISOR
            x = jnp.transpose(x, (0, 2, 3, 1))
        else:
            x = params
        if self.decorrelate:
            x = x @ jnp.asarray(COLOR_MATRIX.T)
        return x

    def image(self, params: jax.Array) -> jax.Array:
        """The images in [0, 1], N x H x W x C."""
        return jax.nn.sigmoid(self.linear(params))

