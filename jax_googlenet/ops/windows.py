"""Window views: the shifted, strided slices of a padded NHWC map that the "slices" convolution (im2col) and
max pool are built from. Slices rather than a gather: XLA fuses a sum or maximum of them into one
elementwise pass."""

from __future__ import annotations

import jax


def strided_view(xp, i: int, j: int, stride: int, ho: int, wo: int):
    """xp[:, i::stride, j::stride] cut to ho x wo: the inputs that window offset (i, j) sees."""
    n, _, _, c = xp.shape
    return jax.lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                         (1, stride, stride, 1))


def shifted_slices(x, window: int, stride: int):
    """The window*window strided views x[:, i::stride, j::stride] of a padded NHWC x, one per window offset."""
    _, h, w, _ = x.shape
    ho, wo = (h - window) // stride + 1, (w - window) // stride + 1
    return [strided_view(x, i, j, stride, ho, wo) for i in range(window) for j in range(window)]
