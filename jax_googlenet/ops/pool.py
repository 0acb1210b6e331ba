"""Pooling: max pool (torch's ceil/floor mode or TensorFlow's SAME) and torch's adaptive average pool.

Two max pool kernels; which one computes a layer is `jax_googlenet.ops.plan`'s choice:
- `max_pool_reduce_window`: XLA's `reduce_window`, whose autodiff backward XLA:CPU expands into iota,
  reduce-window and scatter;
- `max_pool_slices`: the elementwise maximum of the window's shifted slices, with a custom backward that routes
  each gradient to the window's first maximum (torch's rule, tested on ties against torch) in one fused
  elementwise pass; for strided pools that pass is one pad per window offset (`_spread_strided`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_googlenet.ops.windows import shifted_slices, strided_view

def pool_output_size(n: int, window: int, stride: int, pad: int, mode: str) -> int:
    """Output length of a pool over `n` inputs, as torch (floor/ceil mode) or TensorFlow SAME computes it."""
    if mode == "same":
        return -(-n // stride)
    if mode == "floor":
        return (n + 2 * pad - window) // stride + 1
    out = -(-(n + 2 * pad - window) // stride) + 1
    # torch: the last window must start inside the input or its left padding.
    return out - 1 if (out - 1) * stride >= n + pad else out


def pool_padding(n: int, window: int, stride: int, pad: int, mode: str) -> tuple[int, int]:
    """(low, high) padding that makes a VALID reduce_window give `pool_output_size` outputs."""
    out = pool_output_size(n, window, stride, pad, mode)
    if mode == "same":
        total = max((out - 1) * stride + window - n, 0)
        return total // 2, total - total // 2
    return pad, max((out - 1) * stride + window - n - pad, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _window_max(xp, window: int, stride: int):
    """Max over window x window windows of an already padded NHWC xp, as the maximum of shifted slices."""
    return functools.reduce(jax.lax.max, shifted_slices(xp, window, stride))


def _window_max_fwd(xp, window, stride):
    y = _window_max(xp, window, stride)
    return y, (xp, y)


def _first_argmax(xp, y, window: int, stride: int):
    """For each output, the row-major index of the first window offset whose input equals the maximum."""
    ho, wo = y.shape[1:3]
    dtype = jnp.int8 if window * window < 128 else jnp.int32
    idx = jax.lax.full(y.shape, -1, dtype)
    for k in reversed(range(window * window)):  # the lowest matching offset is written last
        i, j = divmod(k, window)
        hit = jax.lax.eq(strided_view(xp, i, j, stride, ho, wo), y)
        idx = jax.lax.select(hit, jax.lax.full(y.shape, k, dtype), idx)
    return idx


def _window_max_bwd(window, stride, res, g):
    """Each output's gradient goes to the first input of its window (row-major) equal to the maximum, torch's
    max_pool2d rule. Strided pools: `_spread_strided`. Stride 1: the gradient and the argmax are edge-padded by
    the window once and every input sums the window*window shifted views that can reach it, one elementwise pass
    that XLA fuses. Differentiating the jnp.maximum chain instead splits ties and costs a select and a divide per
    offset."""
    xp, y = res
    n, h, w, c = xp.shape
    ho, wo = y.shape[1:3]
    if stride > 1:
        return (_spread_strided(g, _first_argmax(xp, y, window, stride), window, stride, xp.shape),)
    cfg = [(0, 0, 0), (window - 1, h - ho, 0), (window - 1, w - wo, 0), (0, 0, 0)]  # stride 1 from here
    gp = jax.lax.pad(g, jnp.zeros((), g.dtype), cfg)
    idx = _first_argmax(xp, y, window, stride)
    ip = jax.lax.pad(idx, jnp.asarray(-1, idx.dtype), cfg)
    dxp = None
    for k in range(window * window):
        i, j = divmod(k, window)
        a, b = window - 1 - i, window - 1 - j
        view = lambda t: jax.lax.slice(t, (0, a, b, 0), (n, a + h, b + w, c))  # noqa: E731
        hit = jax.lax.eq(view(ip), jax.lax.full(xp.shape, k, ip.dtype))
        part = jax.lax.select(hit, view(gp), jax.lax.full(xp.shape, 0, gp.dtype))
        dxp = part if dxp is None else dxp + part
    return (dxp,)


def _spread_strided(g, idx, window: int, stride: int, shape):
    """The strided pool's input gradient: for each window offset k, the outputs' gradient where k is the first
    argmax, placed at the inputs that offset reads by one pad (low edge k's row and column, interior stride - 1),
    the window*window pads summed: one pass over output-sized arrays, no interior-padded copy of the gradient or
    the argmax written (pool1's forward + backward at batch 16/224 takes 12-14 ms, PyTorch's 18.8; benchmarks/
    NOTES.md, "XLA's own dots, conv1's weight gradient, batch norm's statistics, the strided pools' backward").
    The sum runs in a `lax.cond` on a predicate that always holds (an argmax is never negative) but that XLA
    cannot fold: XLA keeps a conditional's operands as written arrays; without it XLA fuses the argmax and the
    gradient's own computation into every pad term and the step runs 17-20% slower."""
    h, w = shape[1:3]
    ho, wo = g.shape[1:3]

    def spread(g, idx):
        dxp = None
        for k in range(window * window):
            i, j = divmod(k, window)
            part = jax.lax.select(jax.lax.eq(idx, jax.lax.full(idx.shape, k, idx.dtype)), g,
                                  jax.lax.full(g.shape, 0, g.dtype))
            term = jax.lax.pad(part, jnp.zeros((), g.dtype),
                               [(0, 0, 0), (i, h - i - stride * (ho - 1) - 1, stride - 1),
                                (j, w - j - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)])
            dxp = term if dxp is None else dxp + term
        return dxp

    always = jax.lax.ge(idx[0, 0, 0, 0], jnp.asarray(0, idx.dtype))
    return jax.lax.cond(always, spread, lambda g, idx: jnp.zeros(shape, g.dtype), g, idx)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


def max_pool_reduce_window(x, window: int, stride: int, mode: str, pad: int = 0):
    """Max pool over H and W (torch's ceil/floor mode or TensorFlow's SAME, padding with -inf) as XLA's
    reduce_window."""
    pads = [pool_padding(n, window, stride, pad, mode) for n in x.shape[1:3]]
    return nn.max_pool(x, (window, window), (stride, stride), padding=pads)


def max_pool_slices(x, window: int, stride: int, mode: str, pad: int = 0):
    """The same max pool as the maximum of shifted slices, with the first-maximum custom backward."""
    pads = [pool_padding(n, window, stride, pad, mode) for n in x.shape[1:3]]
    x = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
    return _window_max(x, window, stride)


def adaptive_avg_pool(x, out: int):
    """torch's adaptive_avg_pool2d to out x out: bin i spans [floor(i*n/out), ceil((i+1)*n/out)), so bins
    overlap when out does not divide n (14 -> 4 in torchvision's aux heads)."""

    def bins(n):
        m = np.zeros((out, n))  # float64, rounded once to x.dtype
        for i in range(out):
            lo, hi = (i * n) // out, -(-((i + 1) * n) // out)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return jnp.asarray(m, x.dtype)

    return jnp.einsum("nhwc,ih,jw->nijc", x, bins(x.shape[1]), bins(x.shape[2]))

