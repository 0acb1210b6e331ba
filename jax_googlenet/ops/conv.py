"""2-D convolution, NHWC x HWIO, in three implementations chosen by `impl` (see `jax_googlenet.ops`).

"xla": `lax.conv_general_dilated` and its autodiff backward; the GPU's path (cuDNN).

"slices", the CPU's path, where XLA:CPU's convolution backward is the slow part of the train step:
- 1x1 convolutions: one 2-D dot over channels (`_matmul`).
- stride-1 k x k convolutions (`_conv_kxk`, a custom VJP): XLA's convolution forward on maps of 8x8 and more,
  an im2col dot below (XLA's is 3-10x slower on 2x2 maps); backward as dots on the k*k shifted views, keeping
  x rather than its k*k times larger im2col, except XLA's weight gradient on 12-28 wide outputs, where it is
  1.3-2.6x faster than the im2col dot.
- strided convolutions (conv1, 7x7/2 on the image): XLA's convolution and its autodiff backward.
"winograd", the CPU's default: as "slices", with fewer multiplications for stride-1 k x k convolutions:
- maps of fewer than k*k positions (3x3 on 2x2 and 1x1, 5x5 below 5x5): one dense product without the zero
  taps of the padding (`_conv_dense`);
- maps that `WINOGRAD` tiles, from WINOGRAD_MIN_CHANNELS input channels: Winograd's F(m x m, k x k)
  (`jax_googlenet.ops.winograd`).
Every figure is from benchmarks/NOTES.md, sections "Attempts" and "Winograd convolution", measured in the full
train step on the project's 2-core CPU; tests/test_ops.py checks each path against `torch.nn.functional.conv2d`
in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_googlenet.ops.windows import shifted_slices
from jax_googlenet.ops.winograd import conv_winograd

# Stride-1 k x k forward on maps at least this wide: XLA's convolution (NOTES.md, "XLA's convolution for the
# forward, dots for the backward").
XLA_FORWARD_MIN_SIDE = 8
# Its weight gradient on outputs with both sides in this range: XLA's (NOTES.md, "XLA's convolution backward for
# the weight gradient on outputs 12 to 28 wide").
XLA_WEIGHT_GRAD_SIDES = (12, 28)


def _xla_conv(x, kernel, stride: int, padding: int):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _im2col(x, k: int, padding: int):
    """(n, ho, wo, k*k*c): the k*k shifted views of the zero-padded x side by side, offset-major."""
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0)])
    return jnp.concatenate(shifted_slices(x, k, 1), axis=-1)


def _im2col_weight_grad(x, dy, k: int, padding: int):
    """im2col(x)^T dy, (k*k*C, O): a convolution's weight gradient as one 2-D dot (rows contracted)."""
    cols = _im2col(x, k, padding).reshape(-1, k * k * x.shape[-1])
    return jax.lax.dot_general(cols, dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())))


# Winograd's F(m x m, k x k) for stride-1 k x k convolutions: the first m listed whose tiles divide the output
# map (no padded tiles); other sizes keep `_conv_kxk`. Chosen in the train step at 224, 96 and 32 (NOTES.md,
# "Winograd convolution"): F(4x4, 3x3) on 56, 28, 24, 12 and 8, F(2x2, 3x3) on 14 and 6; the 7x7 maps (two
# tiles of 4 for 7 outputs) and the 5x5 convolutions did not pay.
WINOGRAD = {3: (4, 2)}
# ... and only with at least this many input channels: leaving the inception blocks' narrow third-branch 3x3
# convolutions (16 to 48 channels in) on `_conv_kxk` took 5 s off the 16/224 train step's compile for ~2% of
# its speed (NOTES.md, "Winograd convolution", W12).
WINOGRAD_MIN_CHANNELS = 64


def winograd_tile(k: int, ho: int, wo: int, c: int) -> int | None:
    """m of F(m x m, k x k) for a stride-1 k x k convolution of c input channels with ho x wo outputs, or None."""
    if c < WINOGRAD_MIN_CHANNELS:
        return None
    return next((m for m in WINOGRAD.get(k, ()) if ho % m == 0 and wo % m == 0), None)


def conv2d(x, kernel, stride: int, padding: int, impl: str = "xla"):
    """NHWC x HWIO convolution. "xla": lax.conv_general_dilated, forward and backward. "slices": a 1x1 conv is
    one dot over channels; a stride-1 k x k conv (`_conv_kxk`) has a backward made of dots on the k*k shifted
    views, which XLA:CPU runs faster than its convolution backward (module docstring).
    A strided conv (conv1) is XLA's convolution, forward and backward.
    "winograd": as "slices", but a stride-1 k x k conv on a map smaller than k x k is one dense product without
    the zero taps (`_conv_dense`), and on larger maps Winograd's F(m x m, k x k) where `WINOGRAD` lists the
    size, in float32 and float64 (in bfloat16, whose rounding error Winograd's transforms would multiply, the
    slices path)."""
    if impl == "xla":
        return _xla_conv(x, kernel, stride, padding)
    if stride > 1:
        # XLA's weight gradient: the train step +2% at 16/224 and +4% at 64/32 against im2col + dot over chunks
        # of two images in a scan, within the noise at 64/96, and ~1 s less compile (NOTES.md, H14)
        return _xla_conv(x, kernel, stride, padding)
    k = kernel.shape[0]
    if k == 1 and padding == 0:
        return _matmul(x, kernel[0, 0])
    if impl == "winograd":
        h, w = x.shape[1:3]
        if h * w < k * k:
            return _conv_dense(x, kernel, padding)
        m = winograd_tile(k, h + 2 * padding - k + 1, w + 2 * padding - k + 1, x.shape[-1])
        if m is not None and jnp.finfo(x.dtype).nmant >= jnp.finfo(jnp.float32).nmant:
            return conv_winograd(x, kernel, padding, m)
    return _conv_kxk(x, kernel, padding)


def _conv_dense(x, kernel, padding: int):
    """A stride-1 k x k convolution of a map of fewer than k*k positions as one (H*W*C, Ho*Wo*K) product: the
    operator's nonzero blocks only (on a 2x2 map 16 C*K multiply-adds per image where the 3x3 im2col does 36,
    on a 1x1 map the centre tap alone). Autodiff's backward is two 2-D dots and the blocks' scatter-add."""
    k, _, c, o = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    # tap (a - i + padding, b - j + padding) joins input (a, b) to output (i, j), where it lies in the kernel
    a, b, i, j = np.meshgrid(np.arange(h), np.arange(w), np.arange(ho), np.arange(wo), indexing="ij")
    ti, tj = a - i + padding, b - j + padding
    valid = (ti >= 0) & (ti < k) & (tj >= 0) & (tj < k)
    blocks = kernel[np.clip(ti, 0, k - 1), np.clip(tj, 0, k - 1)]  # (h, w, ho, wo, c, o)
    blocks = jnp.where(valid[..., None, None], blocks, jnp.zeros((), kernel.dtype)) if not valid.all() else blocks
    dense = blocks.transpose(0, 1, 4, 2, 3, 5).reshape(h * w * c, ho * wo * o)
    return _matmul(x.reshape(n, h * w * c), dense).reshape(n, ho, wo, o)


def _matmul(x, w):
    """(..., C) @ (C, O) as a 2-D dot. Its autodiff weight gradient is then a 2-D dot contracting rows,
    which XLA:CPU runs at 1.4-1.8x the speed of the same contraction over a 4-D array's (N, H, W) axes (that
    one transposes the operand first; benchmarks/NOTES.md, "Dots on 2-D reshapes")."""
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (0,)), ((), ())))
    return y.reshape(*x.shape[:-1], w.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_kxk(x, kernel, padding: int):
    """Stride-1 k x k convolution. Forward: XLA's convolution on maps of at least XLA_FORWARD_MIN_SIDE, where
    XLA:CPU runs it faster, else one dot of the im2col by the (k*k*C, O) kernel (XLA's conv is 3-10x slower on
    2x2 maps). Backward: dots only, whichever way the forward went."""
    k, _, c, o = kernel.shape
    if min(x.shape[1:3]) >= XLA_FORWARD_MIN_SIDE:
        return _xla_conv(x, kernel, 1, padding)
    return _matmul(_im2col(x, k, padding), kernel.reshape(k * k * c, o))


def _conv_kxk_fwd(x, kernel, padding):
    return _conv_kxk(x, kernel, padding), (x, kernel)  # x, not its 9x larger im2col, is kept for the backward


def _conv_kxk_bwd(padding, res, dy):
    """d kernel = im2col(x)^T dy, or XLA's convolution backward on outputs XLA_WEIGHT_GRAD_SIDES wide (there
    1.3-2.6x faster; at 56x56 1.8x slower). d x: dcols = dy kernel^T, (n, h, w, k*k*C); input position q
    sums dcols[q + padding - (i, j), block (i, j)] over the offsets: k*k shifted views of one padded array,
    which XLA fuses into one elementwise pass."""
    x, kernel = res
    k, _, c, o = kernel.shape
    n, h, w, _ = dy.shape
    dy2 = dy.reshape(-1, o)
    lo, hi = XLA_WEIGHT_GRAD_SIDES
    if lo <= min(h, w) and max(h, w) <= hi:
        dk = jax.vjp(lambda kern: _xla_conv(x, kern, 1, padding), kernel)[1](dy)[0]
    else:
        dk = _im2col_weight_grad(x, dy, k, padding)
    dcols = jax.lax.dot_general(dy2, kernel.reshape(k * k * c, o), (((1,), (1,)), ((), ()))).reshape(n, h, w, -1)
    dp = jax.lax.pad(dcols, jnp.zeros((), dcols.dtype), [(0, 0, 0), (k - 1, k - 1, 0), (k - 1, k - 1, 0), (0, 0, 0)])
    dx = None
    for i in range(k):
        for j in range(k):
            a, b, blk = k - 1 - i + padding, k - 1 - j + padding, (i * k + j) * c
            view = jax.lax.slice(dp, (0, a, b, blk), (n, a + x.shape[1], b + x.shape[2], blk + c))
            dx = view if dx is None else dx + view
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)
