"""Normalisation: batch norm's training forward and custom backward, and the paper variant's local response
normalisation (its Figure 3: after the stem's first pool and after conv3).

Batch norm in training (`batch_norm_train`): the forward's statistics are the two-pass ones, the mean and then the
mean of (x - mean)^2; XLA writes x - mean once and shares it with the backward, which computes it again from x; the
normalised output is left to XLA to fuse into its consumer. XLA:CPU runs the sums as YNNPACK fusions, which take no
broadcast subtraction inside, so a one-pass variance would write a shifted copy of x as well: one pass over memory
more per layer for the same speed (benchmarks/NOTES.md, "XLA's own dots, conv1's weight gradient, batch norm's
statistics, the strided pools' backward"). The custom backward reads x - mean and the gradient once for sum(g) and
sum(g * (x - mean)) and once to write dx: batch norm + ReLU forward and backward at conv1's output
(16 x 112 x 112 x 64) takes 42 ms against autodiff's 80, at 16 x 28 x 28 x 256 7 against 11; in the 16/224 train
step, where XLA fuses autodiff's passes with their neighbours, the same speed, 3% less CPU time and 2-5 s less
compile (benchmarks/NOTES.md, "The step beyond the convolutions: host memory, batch norm"). Both reductions are
plain sums, which XLA:CPU runs 1.5-3x faster than one variadic reduce computing the two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def local_response_norm(x, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """Across-channel LRN as torch.nn.LocalResponseNorm and Caffe compute it (alpha divided by size)."""
    sq = jax.lax.reduce_window(jnp.square(x), 0.0, jax.lax.add, (1, 1, 1, size), (1, 1, 1, 1),
                               [(0, 0), (0, 0), (0, 0), (size // 2, (size - 1) // 2)])
    return x / (k + alpha / size * sq) ** beta


def batch_norm_train(x, scale, bias, epsilon: float, dtype):
    """Batch norm over all but the last axis with the batch's statistics: (y, mean, biased variance), y in
    `dtype`, the statistics in float32 or scale's wider dtype. y = (x - mean) * scale / sqrt(var + epsilon) + bias,
    torch's formula; its gradient with respect to x, scale and bias (and through mean and var) is
    `_batch_norm_bwd`'s."""
    return _batch_norm(x, scale, bias, epsilon, dtype)


def batch_norm_apply(x, mean, var, scale, bias, epsilon: float, dtype):
    """torch's formula with given statistics, (x - mean) * scale / sqrt(var + epsilon) + bias, in `dtype`: the
    training forward's with the batch's, evaluation's with the running ones."""
    mul = scale.astype(mean.dtype) * lax.rsqrt(var + epsilon)
    return (x.astype(dtype) - mean.astype(dtype)) * mul.astype(dtype) + bias.astype(dtype)


def update_running_stats(ra_mean, ra_var, mean, var, n: int, momentum: float):
    """torch's running statistics after a batch of `n` positions with biased variance `var`: each
    momentum * running + (1 - momentum) * batch, the variance taken unbiased (n / (n - 1))."""
    return (momentum * ra_mean + (1 - momentum) * mean,
            momentum * ra_var + (1 - momentum) * var * (n / max(n - 1, 1)))


def _sums(d, e):
    """(sum(d), sum(d * e)) over all but the last axis."""
    axes = tuple(range(d.ndim - 1))
    return jnp.sum(d, axes), jnp.sum(d * e, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, scale, bias, epsilon: float, dtype):
    return _batch_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, dtype):
    stats = jnp.promote_types(jnp.float32, scale.dtype)
    n = x.size // x.shape[-1]
    xf = x.astype(stats)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.sum(xf, axes) / n
    xc = xf - mean
    var = jnp.sum(xc * xc, axes) / n
    y = batch_norm_apply(x, mean, var, scale, bias, epsilon, dtype)
    return (y, mean, var), (x, mean, lax.rsqrt(var + epsilon), scale, bias)


def _batch_norm_bwd(epsilon, dtype, res, cotangents):
    """With xc = x - mean, k = scale / sqrt(var + epsilon), G = sum(g), Gx = sum(g * xc) and n positions:
    dbias = G, dscale = Gx / std, dx = k g - (k G / n - g_mean / n) - (k Gx / (n var') - 2 g_var / n) xc,
    var' = var + epsilon; g_mean and g_var, the cotangents of the returned statistics, are zero in training."""
    x, mean, rstd, scale, bias = res
    g, g_mean, g_var = cotangents
    stats = mean.dtype
    n = x.size // x.shape[-1]
    xc = x.astype(stats) - mean
    gf = g.astype(stats)
    sg, sgx = _sums(gf, xc)
    k = scale.astype(stats) * rstd
    c1 = k * sg / n - g_mean / n
    c2 = k * rstd * rstd * sgx / n - 2 * g_var / n
    dx = k * gf - c1 - c2 * xc
    return dx.astype(x.dtype), (sgx * rstd).astype(scale.dtype), sg.astype(bias.dtype)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
