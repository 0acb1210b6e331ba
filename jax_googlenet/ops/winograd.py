"""Winograd convolution (Lavin & Gray, arXiv:1509.09308) for stride-1 k x k layers: fewer multiplications.

F(m x m, r x r) computes an m x m output tile from an a x a input tile, a = m + r - 1, with a^2 products per
(input, output) channel pair instead of m^2 r^2: 2.25x fewer for F(2x2, 3x3), 4x for F(4x4, 3x3).
Y = A^T [(G g G^T) . (B^T d B)] A, per tile; the products over channels are one batched dot over the a^2
transform-domain positions. The backward is Winograd-domain too: dM = A dY A^T, dU = V^T dM, dV = dM U^T, and the
kernel's and the input's gradients are the transposed filter and input transforms.

Two choices, both measured (benchmarks/NOTES.md, "Winograd convolution"):
- the transforms are two passes (rows, then columns) over strided views of the map, each written as sparse
  additions that compute the halves of each +-p pair of interpolation points once, or, for the data transform,
  as multiply-adds against broadcast columns of the matrix (`FORMS`);
- the pipeline runs over the whole batch at once, the form XLA:CPU runs the train step and compiles it fastest
  in once malloc keeps freed blocks (`jax_googlenet.host_memory`; NOTES.md, "The step beyond the convolutions:
  host memory, batch norm").
Float32 error (tests/test_ops.py bounds it per layer shape): the relative error against a float64 reference is
up to 6e-7 with F(2x2, 3x3) and 3e-6 with F(4x4, 3x3), against 1e-6 for XLA's convolution.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# Interpolation points (the last one, infinity, is implicit): small integers first, then halves, as in the
# paper; they keep the transforms' coefficients, and so the float32 rounding error, small.
POINTS = (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2), 3, -3)


def _inverse(a: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact inverse of a square matrix of Fractions (Gauss-Jordan)."""
    n = len(a)
    m = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(a)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if m[r][col] != 0)
        m[col], m[pivot] = m[pivot], m[col]
        p = m[col][col]
        m[col] = [v / p for v in m[col]]
        for r in range(n):
            if r != col and m[r][col] != 0:
                f = m[r][col]
                m[r] = [v - f * w for v, w in zip(m[r], m[col])]
    return [row[n:] for row in m]


@functools.lru_cache(maxsize=None)
def transforms(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T [m, a], G [a, r], B^T [a, a]) of F(m, r), a = m + r - 1, exact rationals rounded once to float64.

    Toom-Cook: the linear convolution c = g * h is c = V^-1 [(Vr g) . (Vm h)] with Vandermonde matrices Vn of
    the a - 1 points plus infinity; the correlation y = T(g)^T d is its transpose, y = Vm^T [(Vr g) . (V^-T d)].
    Each row of B^T is scaled to integers and G's row by the inverse, so the data transform has no fractions.
    """
    a = m + r - 1
    points = [Fraction(p) for p in POINTS[: a - 1]]

    def vandermonde(n):
        return [[p ** j for j in range(n)] for p in points] + [[Fraction(int(j == n - 1)) for j in range(n)]]

    bt = [list(row) for row in zip(*_inverse(vandermonde(a)))]  # V^-T
    g = vandermonde(r)
    for i, row in enumerate(bt):
        scale = Fraction(np.lcm.reduce([v.denominator for v in row]))
        scale /= np.gcd.reduce([int(v * scale) for v in row if v != 0])
        bt[i] = [v * scale for v in row]
        g[i] = [v / scale for v in g[i]]
    at = [list(col) for col in zip(*vandermonde(m))]
    as_array = lambda rows: np.array([[float(v) for v in row] for row in rows])  # noqa: E731
    return as_array(at), as_array(g), as_array(bt)


def tiles(n: int, m: int) -> int:
    return -(-n // m)


def _combine(coeffs: np.ndarray, terms: list) -> jax.Array:
    """sum_i coeffs[i] * terms[i], skipping zero coefficients and multiplying by +-1 as additions."""
    out = None
    for c, t in zip(coeffs, terms):
        if c == 0:
            continue
        t = t if c == 1 else (lax.neg(t) if c == -1 else lax.mul(t, lax.full_like(t, c)))
        out = t if out is None else lax.add(out, t)
    if out is None:
        return lax.full_like(terms[0], 0)
    return out


def _paired(mat: np.ndarray, rows: bool) -> list[tuple[int, int, int]]:
    """Pairs (a, b, sign) of rows (or columns) with mat[b, i] = sign (-1)^i mat[a, i]: the transforms' rows (or
    columns) for the interpolation points +p and -p, whose even and odd halves are shared."""
    mat = mat if rows else mat.T
    alternate = (-1.0) ** np.arange(mat.shape[1])
    pairs, taken = [], set()
    for a in range(len(mat)):
        for b in range(a + 1, len(mat)):
            if a in taken or b in taken or not (mat[a] * alternate != mat[a]).any():
                continue
            for sign in (1, -1):
                if np.array_equal(mat[b], sign * alternate * mat[a]):
                    pairs.append((a, b, sign))
                    taken |= {a, b}
    return pairs


def _linear(mat: np.ndarray, parts: list) -> list:
    """[sum_i mat[p, i] parts[i] for each row p] as additions, the halves of +-p pairs computed once: for paired
    rows a, b the even-index and odd-index partial sums E, O give E + O and +-(E - O); for paired columns the
    sum and the difference of the two parts serve every row."""
    row_pairs = _paired(mat, rows=True)
    if row_pairs:
        out = [None] * len(mat)
        even = np.arange(mat.shape[1]) % 2 == 0
        for a, b, sign in row_pairs:
            e, o = _combine(mat[a] * even, parts), _combine(mat[a] * ~even, parts)
            out[a], out[b] = lax.add(e, o), (lax.sub(e, o) if sign == 1 else lax.sub(o, e))
        return [_combine(row, parts) if out[r] is None else out[r] for r, row in enumerate(mat)]
    col_pairs = _paired(mat, rows=False)
    if col_pairs:
        parts, mat = list(parts), mat.copy()
        for a, b, sign in col_pairs:
            # row r: mat[r, a] (parts[a] + sign (-1)^r parts[b]): the sum on some rows, the difference on the others
            diff = (np.arange(len(mat)) % 2 == 1) == (sign == 1)
            parts[a], parts[b] = lax.add(parts[a], parts[b]), lax.sub(parts[a], parts[b])
            mat[diff, b], mat[diff, a] = mat[diff, a], 0
            mat[~diff, b] = 0
        return [_combine(row, parts) for row in mat]
    return [_combine(row, parts) for row in mat]


# How each transform is written: "pairs" as the sparse additions of `_linear` (the fewest operations), or
# "broadcast" as one multiply-add per input row of the matrix against its column broadcast along the output
# rows (XLA emits one loop for the fusion instead of one per output row). Measured in the 16/224 train step
# (benchmarks/NOTES.md, "Winograd convolution"): the data transform B^T d B compiles faster broadcast at the
# same step speed; the output transform and both gradient transforms run ~4% faster as pairs.
# Folded inference's data transform ("inference_data") runs faster as pairs: its eval step +5% at 16/224 and +11%
# at 64/96, alternated in one process (benchmarks/NOTES.md, "Folded inference", "The data transform as pairs").
FORMS = {"data": "broadcast", "output": "pairs", "output_grad": "pairs", "data_grad": "pairs", "filter": "pairs",
         "inference_data": "pairs"}


def _apply_parts(mat: np.ndarray, parts: list, axis: int, form: str):
    """sum_i mat[:, i] parts[i], stacked along a new `axis`: mat.shape[0] entries there."""
    if form == "broadcast":
        shape = list(parts[0].shape)
        shape.insert(axis, mat.shape[0])
        others = tuple(d for d in range(len(shape)) if d != axis)
        out = None
        for i, part in enumerate(parts):
            if not mat[:, i].any():
                continue
            column = lax.broadcast_in_dim(jnp.asarray(mat[:, i], part.dtype), shape, (axis,))
            term = lax.mul(column, lax.broadcast_in_dim(part, shape, others))
            out = term if out is None else lax.add(out, term)
        return out
    return lax.concatenate([lax.expand_dims(t, (axis,)) for t in _linear(mat, parts)], axis)


def _apply(mat: np.ndarray, stacked, axis: int, form: str):
    """mat applied along `axis` of stacked (whose `axis` has mat.shape[1] entries): mat.shape[0] entries there."""
    parts = [lax.index_in_dim(stacked, i, axis, keepdims=False) for i in range(mat.shape[1])]
    return _apply_parts(mat, parts, axis, form)


def tiles_in(xp, mat: np.ndarray, stride: int, ht: int, wt: int, form: str = "pairs"):
    """mat T mat^T of every (tile x tile) window of xp at stride `stride`, tile = mat.shape[1]: (p*p, n, ht, wt, c)
    for p = mat.shape[0]; xp already padded to at least (ht - 1) * stride + tile on each side."""
    p, tile = mat.shape
    n, _, w, c = xp.shape
    rows = _apply_parts(mat, [lax.slice(xp, (0, i, 0, 0), (n, i + stride * (ht - 1) + 1, w, c), (1, stride, 1, 1))
                              for i in range(tile)], 0, form)  # (p, n, ht, w, c)
    cols = [lax.slice(rows, (0, 0, 0, j, 0), (p, n, ht, j + stride * (wt - 1) + 1, c), (1, 1, 1, stride, 1))
            for j in range(tile)]
    return lax.reshape(_apply_parts(mat, cols, 1, form), (p * p, n, ht, wt, c))


def tiles_out(t, mat: np.ndarray, stride: int, h: int, w: int, offset: int = 0, form: str = "pairs",
              epilogue=None):
    """The map y[n, ts + i, us + j] = sum over tiles (t, u) and (p, q) of mat[i, p] mat[j, q] T[p, q, n, t, u]
    (tiles of mat.shape[0] rows at stride `stride`, overlapping when that is more than the stride), cropped to
    rows and columns offset ... offset + h (w): the transpose of `tiles_in`, and the Winograd output transform.
    `epilogue`, an elementwise function over the last (channel) axis, is applied to the summed tiles in the
    same pass."""
    tile, p = mat.shape
    _, n, ht, wt, c = t.shape
    t = lax.reshape(t, (p, p, n, ht, wt, c))
    d = _apply(mat, _apply(mat, t, 1, form), 0, form)  # (tile, tile, n, ht, wt, c)
    extra = tiles(tile, stride) - 1  # tiles each output row can be reached from, beyond its own
    if extra:
        # tile offset i = i0 + stride * k reaches row (t + k) * stride + i0: pad the tile axes to whole strides,
        # split them into (k, i0), and sum the k-shifted tile grids
        full = (extra + 1) * stride
        zero = jnp.zeros((), d.dtype)
        d = lax.pad(d, zero, [(0, full - tile, 0)] * 2 + [(0, 0, 0)] * 4)
        d = lax.reshape(d, (extra + 1, stride, extra + 1, stride, n, ht, wt, c))
        d = functools.reduce(lax.add, [
            lax.pad(lax.index_in_dim(lax.index_in_dim(d, k, 0, keepdims=False), l, 1, keepdims=False), zero,
                    [(0, 0, 0)] * 3 + [(k, extra - k, 0), (l, extra - l, 0), (0, 0, 0)])
            for k in range(extra + 1) for l in range(extra + 1)])
    if epilogue is not None:
        d = epilogue(d)
    ht, wt = ht + extra, wt + extra
    y = lax.reshape(lax.transpose(d, (2, 3, 0, 4, 1, 5)), (n, ht * stride, wt * stride, c))
    return lax.slice(y, (0, offset, offset, 0), (n, offset + h, offset + w, c))


def _shapes(x_shape, r: int, padding: int, m: int):
    n, h, w, _ = x_shape
    ho, wo = h + 2 * padding - r + 1, w + 2 * padding - r + 1
    return ho, wo, tiles(ho, m), tiles(wo, m)


def _padded(x, padding: int, m: int, r: int, ht: int, wt: int):
    a = m + r - 1
    _, h, w, _ = x.shape
    hp, wp = (ht - 1) * m + a, (wt - 1) * m + a
    return lax.pad(x, jnp.zeros((), x.dtype),
                   [(0, 0, 0), (padding, hp - h - padding, 0), (padding, wp - w - padding, 0), (0, 0, 0)])


def filter_transform(kernel, g: np.ndarray):
    """G g G^T per (input, output) channel pair: (a*a, c, k)."""
    r, _, c, k = kernel.shape
    a = g.shape[0]
    return lax.reshape(_apply(g, _apply(g, kernel, 1, FORMS["filter"]), 0, FORMS["filter"]), (a * a, c, k))


def filter_transform_transpose(du, g: np.ndarray):
    """G^T dU G: the kernel's gradient from the transform-domain one, (r, r, c, k)."""
    a, r = g.shape
    _, c, k = du.shape
    return _apply(g.T, _apply(g.T, lax.reshape(du, (a, a, c, k)), 1, FORMS["filter"]), 0, FORMS["filter"])


def conv_winograd(x, kernel, padding: int, m: int):
    """Stride-1 r x r convolution of NHWC x by HWIO kernel with F(m x m, r x r), forward and backward."""
    return _winograd(x, kernel, padding, m)


def _plan(x_shape, k_shape, padding: int, m: int):
    r, _, c, k = k_shape
    a = m + r - 1
    ho, wo, ht, wt = _shapes(x_shape, r, padding, m)
    return (r, c, k, a, ho, wo, ht, wt, *transforms(m, r))


def _data_tiles(x, padding: int, m: int, r: int, ht: int, wt: int, bt: np.ndarray, form: str | None = None):
    """V = B^T d B for every input tile of x: (a*a, n*ht*wt, c), the forward's and the backward's left operand
    (`form`: FORMS["data"] unless given)."""
    a = bt.shape[0]
    v = tiles_in(_padded(x, padding, m, r, ht, wt), bt, m, ht, wt, form or FORMS["data"])
    return lax.reshape(v, (a * a, x.shape[0] * ht * wt, x.shape[-1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd(x, kernel, padding: int, m: int):
    r, c, k, a, ho, wo, ht, wt, at, g, bt = _plan(x.shape, kernel.shape, padding, m)
    v = _data_tiles(x, padding, m, r, ht, wt, bt)
    mm = lax.dot_general(v, filter_transform(kernel, g), (((2,), (1,)), ((0,), (0,))))
    return tiles_out(lax.reshape(mm, (a * a, x.shape[0], ht, wt, k)), at, m, ho, wo, form=FORMS["output"])


def _winograd_fwd(x, kernel, padding, m):
    return _winograd(x, kernel, padding, m), (x, kernel)  # x, not V: the backward recomputes V


def _winograd_bwd(padding, m, res, dy):
    """The transform-domain backward (`_grads`); the kernel's gradient G^T dU G."""
    x, kernel = res
    g = transforms(m, kernel.shape[0])[1]
    dx, du = _grads(x, filter_transform(kernel, g), padding, m, dy)
    return dx, filter_transform_transpose(du, g).astype(kernel.dtype)


def _grads(x, u, padding: int, m: int, dy):
    """(dx, dU) of y = conv(x) through the transform U: dM = A dY A^T per output tile; dU = V^T dM and
    dV = dM U^T per position (batched dots); dx the overlapping sum of B dV B^T over the input tiles."""
    r, c, k, a, ho, wo, ht, wt, at, g, bt = _u_plan(x.shape, u.shape, padding, m)
    n, h, w = x.shape[:3]
    v = _data_tiles(x, padding, m, r, ht, wt, bt)
    dyp = lax.pad(dy, jnp.zeros((), dy.dtype), [(0, 0, 0), (0, ht * m - ho, 0), (0, wt * m - wo, 0), (0, 0, 0)])
    dm = lax.reshape(tiles_in(dyp, at.T, m, ht, wt, FORMS["output_grad"]), (a * a, n * ht * wt, k))
    du = lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))))  # (a*a, c, k)
    dv = lax.dot_general(dm, u, (((2,), (2,)), ((0,), (0,))))  # (a*a, tiles, c)
    dx = tiles_out(lax.reshape(dv, (a * a, n, ht, wt, c)), bt.T, m, h, w, offset=padding, form=FORMS["data_grad"])
    return dx.astype(x.dtype), du


_winograd.defvjp(_winograd_fwd, _winograd_bwd)


def winograd_weights(kernel, m: int):
    """U = G g G^T of an HWIO r x r kernel for F(m x m, r x r): (a*a, c, k), a = m + r - 1. Folded inference
    computes it once per set of variables (`jax_googlenet.fold.prepare`) instead of in every step."""
    return filter_transform(kernel, transforms(m, kernel.shape[0])[1])


def conv_winograd_bias_relu(x, kernel, bias, padding: int, m: int):
    """relu(conv(x, kernel) + bias) with F(m x m, r x r), the bias and the ReLU applied in the output transform's
    pass (folded inference: one pass over the output instead of two); differentiable in x, kernel and bias (the
    kernel's gradient through the filter transform's autodiff)."""
    return winograd_bias_relu(x, winograd_weights(kernel, m), bias, padding, m)


def winograd_bias_relu(x, u, bias, padding: int, m: int):
    """`conv_winograd_bias_relu` on the kernel's transform `u` (`winograd_weights`); differentiable in x, u and
    bias."""
    return _winograd_bias_relu(x, u, bias, padding, m)


def _u_plan(x_shape, u_shape, padding: int, m: int):
    aa, c, k = u_shape
    r = int(round(aa ** 0.5)) - m + 1
    return (r, *_plan(x_shape, (r, r, c, k), padding, m)[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _winograd_bias_relu(x, u, bias, padding: int, m: int):
    r, c, k, a, ho, wo, ht, wt, at, g, bt = _u_plan(x.shape, u.shape, padding, m)
    v = _data_tiles(x, padding, m, r, ht, wt, bt, FORMS["inference_data"])
    mm = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))
    return tiles_out(lax.reshape(mm, (a * a, x.shape[0], ht, wt, k)), at, m, ho, wo, form=FORMS["output"],
                     epilogue=lambda d: jnp.maximum(d + bias.astype(d.dtype), jnp.zeros((), d.dtype)))


def _winograd_bias_relu_fwd(x, u, bias, padding, m):
    y = _winograd_bias_relu(x, u, bias, padding, m)
    return y, (x, u, bias, y)


def _winograd_bias_relu_bwd(padding, m, res, dy):
    """The ReLU's gradient where the output is positive, then the bias's sum and the transform-domain backward
    (`_grads`)."""
    x, u, bias, y = res
    dz = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype))
    dx, du = _grads(x, u, padding, m, dz)
    return dx, du.astype(u.dtype), jnp.sum(dz, axis=(0, 1, 2)).astype(bias.dtype)


_winograd_bias_relu.defvjp(_winograd_bias_relu_fwd, _winograd_bias_relu_bwd)
