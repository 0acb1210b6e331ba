"""2-D convolution kernels, NHWC x HWIO. Which one computes a layer is `jax_googlenet.ops.plan`'s choice.

- `xla_conv`: `lax.conv_general_dilated`, forward and autodiff backward.
- `conv_1x1`: a 1x1 convolution as one 2-D dot over channels (`matmul`).
- `conv_kxk`: a stride-1 k x k convolution with a backward of dots on the k*k shifted views of the map, keeping
  x rather than its k*k times larger im2col; its forward (XLA's convolution or an im2col dot) and its weight
  gradient (XLA's or an im2col dot) are the plan's arguments.
- `conv_dense`: a stride-1 k x k convolution of a map of fewer than k*k positions as one dense product without
  the zero taps of the padding.
Winograd's F(m x m, r x r) is in `jax_googlenet.ops.winograd`. tests/test_ops.py checks each kernel against
`torch.nn.functional.conv2d` in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_googlenet.ops.windows import shifted_slices


def xla_conv(x, kernel, stride: int, padding: int):
    """XLA's convolution, symmetric `padding`."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_1x1(x, kernel):
    """A 1x1 convolution (no padding) as one dot over channels."""
    return matmul(x, kernel[0, 0])


def _im2col(x, k: int, padding: int):
    """(n, ho, wo, k*k*c): the k*k shifted views of the zero-padded x side by side, offset-major."""
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0)])
    return jnp.concatenate(shifted_slices(x, k, 1), axis=-1)


def _im2col_weight_grad(x, dy, k: int, padding: int):
    """im2col(x)^T dy, (k*k*C, O): a convolution's weight gradient as one 2-D dot (rows contracted)."""
    cols = _im2col(x, k, padding).reshape(-1, k * k * x.shape[-1])
    return jax.lax.dot_general(cols, dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())))


def conv_dense(x, kernel, padding: int):
    """A stride-1 k x k convolution of a map of fewer than k*k positions as one (H*W*C, Ho*Wo*K) product: the
    operator's nonzero blocks only (on a 2x2 map 16 C*K multiply-adds per image where the 3x3 im2col does 36,
    on a 1x1 map the centre tap alone). Autodiff's backward is two 2-D dots and the blocks' scatter-add."""
    k = kernel.shape[0]
    n, h, w, _ = x.shape
    return dense_product(x, dense_operator(kernel, h, w, padding), h + 2 * padding - k + 1, w + 2 * padding - k + 1)


def dense_operator(kernel, h: int, w: int, padding: int):
    """The (h*w*C, Ho*Wo*K) matrix of a stride-1 k x k convolution of h x w maps (`conv_dense`). Folded inference
    builds it once per set of variables (`jax_googlenet.fold.prepare`) instead of in every step."""
    k, _, c, o = kernel.shape
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    # tap (a - i + padding, b - j + padding) joins input (a, b) to output (i, j), where it lies in the kernel
    a, b, i, j = np.meshgrid(np.arange(h), np.arange(w), np.arange(ho), np.arange(wo), indexing="ij")
    ti, tj = a - i + padding, b - j + padding
    valid = (ti >= 0) & (ti < k) & (tj >= 0) & (tj < k)
    blocks = kernel[np.clip(ti, 0, k - 1), np.clip(tj, 0, k - 1)]  # (h, w, ho, wo, c, o)
    blocks = jnp.where(valid[..., None, None], blocks, jnp.zeros((), kernel.dtype)) if not valid.all() else blocks
    return blocks.transpose(0, 1, 4, 2, 3, 5).reshape(h * w * c, ho * wo * o)


def dense_product(x, dense, ho: int, wo: int):
    """x (N, H, W, C) times a `dense_operator`: (N, ho, wo, K)."""
    n, h, w, c = x.shape
    return matmul(x.reshape(n, h * w * c), dense).reshape(n, ho, wo, dense.shape[1] // (ho * wo))


def matmul(x, w):
    """(..., C) @ (C, O) as a 2-D dot. Its autodiff weight gradient is then a 2-D dot contracting rows,
    which XLA:CPU runs at 1.4-1.8x the speed of the same contraction over a 4-D array's (N, H, W) axes (that
    one transposes the operand first; benchmarks/NOTES.md, "Dots on 2-D reshapes")."""
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (0,)), ((), ())))
    return y.reshape(*x.shape[:-1], w.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_kxk(x, kernel, padding: int, forward: str, weight_grad: str):
    """Stride-1 k x k convolution. Forward: "xla" (XLA's convolution) or "im2col" (one dot of the im2col by the
    (k*k*C, O) kernel). Backward: the input's gradient as dots on shifted views, the kernel's by `weight_grad`,
    "xla" (XLA's convolution backward) or "im2col" (one dot)."""
    k, _, c, o = kernel.shape
    if forward == "xla":
        return xla_conv(x, kernel, 1, padding)
    return matmul(_im2col(x, k, padding), kernel.reshape(k * k * c, o))


def _conv_kxk_fwd(x, kernel, padding, forward, weight_grad):
    return conv_kxk(x, kernel, padding, forward, weight_grad), (x, kernel)  # x, not its k*k larger im2col


def _conv_kxk_bwd(padding, forward, weight_grad, res, dy):
    """d kernel = im2col(x)^T dy or XLA's. d x: dcols = dy kernel^T, (n, h, w, k*k*C); input position q
    sums dcols[q + padding - (i, j), block (i, j)] over the offsets: k*k shifted views of one padded array,
    which XLA fuses into one elementwise pass."""
    x, kernel = res
    k, _, c, o = kernel.shape
    n, h, w, _ = dy.shape
    dy2 = dy.reshape(-1, o)
    if weight_grad == "xla":
        dk = jax.vjp(lambda kern: xla_conv(x, kern, 1, padding), kernel)[1](dy)[0]
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


conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)
