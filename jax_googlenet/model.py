"""GoogLeNet (Inception v1, Szegedy et al. 2014, arXiv:1409.4842) in Flax linen, NHWC.

One network, three variants given as data (`VARIANTS`):

- ``torchvision``: exactly torchvision 0.29's ``models/googlenet.py`` (the pretrained weights' architecture).
- ``paper``: the paper's Table 1 and Figure 3.
- ``writeup``: the MNIST model of the write-up this project started from (shared/seed), quirks included.

Submodules are named after torchvision's attributes (``conv1``, ``inception3a/branch2_1/conv``, ``aux1/fc1``,
``fc``): a torchvision key maps to a Flax path by replacing ``.N`` with ``_N`` (see ``convert/``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_googlenet.imagenet import MEAN as IMAGENET_MEAN, STD as IMAGENET_STD

Dtype = Any

# name, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool proj: the paper's Table 1, shared by every variant.
INCEPTION_TABLE: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)
# Which stage each auxiliary head reads.
AUX_AFTER = {"aux1": "inception4a", "aux2": "inception4d"}
# Stage outputs that `GoogLeNet.features` returns, besides the pooled vector.
FEATURE_STAGES = ("stem", "inception3b", "inception4e", "inception5b")


@dataclasses.dataclass(frozen=True)
class Variant:
    """The switches in which the three GoogLeNets differ."""

    name: str
    batch_norm: bool  # conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU; else conv with bias -> ReLU
    branch3_kernel: int  # the "5x5" branch: 3 in torchvision (pytorch/vision#906), 5 in the paper
    pool_mode: str  # "ceil": torch ceil_mode; "floor": torch default; "same": TensorFlow SAME
    stem_lrn: bool  # local response normalisation after maxpool1 and after conv3 (paper, Figure 3)
    maxpool4: tuple[tuple[int, int], ...]  # (window, stride) of each pool between 4e and 5a
    branch4_relu: bool  # a ReLU between branch 4's max pool and its 1x1 conv (the write-up's quirk)
    aux_pool: str  # "adaptive4": adaptive average pool to 4x4; "avg5s3": 5x5 stride 3 average pool
    aux_grid: int  # side of the aux head's pooled grid: its fc1 reads aux_grid**2 * 128 features
    aux_dropout_before_fc1: bool  # the write-up also drops out the flattened features
    aux_dropout: float
    dropout: float
    init: str  # "torchvision", "torch_default" (PyTorch's layer defaults) or "he"


VARIANTS: dict[str, Variant] = {
    "torchvision": Variant(
        name="torchvision", batch_norm=True, branch3_kernel=3, pool_mode="ceil", stem_lrn=False,
        maxpool4=((2, 2),), branch4_relu=False, aux_pool="adaptive4", aux_grid=4,
        aux_dropout_before_fc1=False, aux_dropout=0.7, dropout=0.2, init="torchvision"),
    # Table 1 gives no padding for the stride-2 pools but its sizes (112 -> 56 -> 28 -> 14 -> 7) need it: we
    # take TensorFlow's SAME padding, as the authors' own TF-slim inception_v1 does. LRN's constants are not in
    # the paper; we take the BVLC Caffe GoogLeNet's (size 5, alpha 1e-4, beta 0.75). The 7x7 average pool is a
    # global mean, identical at 224 and defined for other sizes. Without BatchNorm, a 22-layer ReLU net needs
    # He initialisation to train from scratch (the paper's DistBelief init is not published).
    "paper": Variant(
        name="paper", batch_norm=False, branch3_kernel=5, pool_mode="same", stem_lrn=True,
        maxpool4=((3, 2),), branch4_relu=False, aux_pool="avg5s3", aux_grid=4,
        aux_dropout_before_fc1=False, aux_dropout=0.7, dropout=0.4, init="he"),
    # The write-up: convs with bias and ReLU, floor-mode 3x3/2 pools, two of them after 4e, a ReLU after the
    # branch-4 pool, and an aux head of 5x5/3 average pool -> 1x1 conv -> fc 1152 (3x3x128), dropout 0.5 twice.
    "writeup": Variant(
        name="writeup", batch_norm=False, branch3_kernel=5, pool_mode="floor", stem_lrn=False,
        maxpool4=((3, 2), (3, 2)), branch4_relu=True, aux_pool="avg5s3", aux_grid=3,
        aux_dropout_before_fc1=True, aux_dropout=0.5, dropout=0.4, init="torch_default"),
}


# Earlier names, refused with a message that gives the current one.
RENAMED = {"seed": "writeup"}


def check_variant(name: str) -> Variant:
    """The variant called `name`; an unknown or renamed name is one line that says what to write instead."""
    if name in VARIANTS:
        return VARIANTS[name]
    if name in RENAMED:
        raise ValueError(f"the variant {name!r} is now called {RENAMED[name]!r}")
    raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")


class GoogLeNetOutputs(NamedTuple):
    """Training-mode outputs. Note: torchvision's own tuple is ordered (logits, aux2, aux1)."""

    logits: jax.Array
    aux1: jax.Array | None
    aux2: jax.Array | None


# ----------------------------------------------------------------------------------------------- sizes


def pool_output_size(n: int, window: int, stride: int, pad: int, mode: str) -> int:
    """Output length of a pool over `n` inputs, as torch (floor/ceil mode) or TensorFlow SAME computes it."""
    if mode == "same":
        return -(-n // stride)
    if mode == "floor":
        return (n + 2 * pad - window) // stride + 1
    out = -(-(n + 2 * pad - window) // stride) + 1
    # torch: the last window must start inside the input or its left padding.
    return out - 1 if (out - 1) * stride >= n + pad else out


def _pool_padding(n: int, window: int, stride: int, pad: int, mode: str) -> tuple[int, int]:
    """(low, high) padding that makes a VALID reduce_window give `pool_output_size` outputs."""
    out = pool_output_size(n, window, stride, pad, mode)
    if mode == "same":
        total = max((out - 1) * stride + window - n, 0)
        return total // 2, total - total // 2
    return pad, max((out - 1) * stride + window - n - pad, 0)


def stage_sizes(variant: str | Variant, side: int) -> dict[str, int]:
    """Spatial side length after each stage, for an input side `side` (rows and columns are independent)."""
    v = check_variant(variant) if isinstance(variant, str) else variant
    sizes = {}
    n = (side + 2 * 3 - 7) // 2 + 1  # conv1: 7x7 stride 2 pad 3
    sizes["conv1"] = n
    n = pool_output_size(n, 3, 2, 0, v.pool_mode)
    sizes["maxpool1"] = n
    n = pool_output_size(n, 3, 2, 0, v.pool_mode)
    sizes["stem"] = n  # after maxpool2
    sizes["inception3b"] = n
    n = pool_output_size(n, 3, 2, 0, v.pool_mode)
    sizes["inception4a"] = sizes["inception4e"] = n
    for window, stride in v.maxpool4:
        n = pool_output_size(n, window, stride, 0, v.pool_mode)
    sizes["inception5b"] = n
    a = sizes["inception4a"]
    sizes["aux"] = 4 if v.aux_pool == "adaptive4" else (a - 5) // 3 + 1
    return sizes


def _side_ok(v: Variant, side: int, aux: bool) -> bool:
    sizes = stage_sizes(v, side)
    ok = side >= 1 and min(n for k, n in sizes.items() if k != "aux") >= 1
    return ok and (not aux or sizes["aux"] == v.aux_grid)


def accepted_sides(variant: str | Variant, aux: bool, up_to: int = 2048) -> tuple[int, int | None]:
    """(smallest, largest or None) input side the variant accepts; the aux heads of the paper and the writeup
    variants have a fixed-size fc1, so with them only a band of sizes works."""
    v = check_variant(variant) if isinstance(variant, str) else variant
    ok = [s for s in range(1, up_to + 1) if _side_ok(v, s, aux)]
    return ok[0], (None if ok[-1] == up_to else ok[-1])


def _check_input(v: Variant, shape: tuple[int, ...], in_channels: int, aux: bool) -> None:
    if len(shape) != 4 or shape[-1] != in_channels:
        raise ValueError(f"GoogLeNet expects NHWC images with {in_channels} channels, got shape {tuple(shape)}")
    for side in shape[1:3]:
        if not _side_ok(v, side, aux):
            lo, hi = accepted_sides(v, aux)
            band = f"{lo} to {hi}" if hi else f"at least {lo}"
            why = " (the aux heads' fc1 has a fixed input size; pass aux_logits=False for others)" if hi else ""
            raise ValueError(f"the {v.name!r} variant{' with aux heads' if aux else ''} accepts image sides "
                             f"of {band} pixels{why}; got {shape[1]}x{shape[2]}")


# ----------------------------------------------------------------------------------------------- layers


def _initializers(init: str) -> tuple[Any, Any]:
    """(kernel, bias) initialisers for convs and fcs; `bias_init` gets the layer's fan-in bound as in torch."""
    if init == "torchvision":
        # torchvision: trunc_normal_(std=0.01, a=-2, b=2); a and b are absolute, i.e. +-200 std.
        return nn.initializers.truncated_normal(0.01, lower=-200.0, upper=200.0), "torch_uniform"
    if init == "torch_default":
        # torch's kaiming_uniform_(a=sqrt(5)) is U(+-1/sqrt(fan_in)); its bias the same bound.
        return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), "torch_uniform"
    return nn.initializers.he_normal(), "zeros"


def _torch_uniform_bias(fan_in: int):
    bound = 1 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


IMPLS = ("auto", "xla", "slices")


def resolve_impl(impl: str) -> str:
    """"auto" is "slices" on the CPU, where it trains faster (benchmarks/NOTES.md), and "xla" elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "slices" if jax.default_backend() == "cpu" else "xla"
    return impl


def _strided_view(xp, i: int, j: int, stride: int, ho: int, wo: int):
    """xp[:, i::stride, j::stride] cut to ho x wo: the inputs that window offset (i, j) sees."""
    n, _, _, c = xp.shape
    return jax.lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                         (1, stride, stride, 1))


def _shifted_slices(x, window: int, stride: int):
    """The window*window strided views x[:, i::stride, j::stride] of a padded NHWC x, one per window offset."""
    _, h, w, _ = x.shape
    ho, wo = (h - window) // stride + 1, (w - window) // stride + 1
    return [_strided_view(x, i, j, stride, ho, wo) for i in range(window) for j in range(window)]


XLA_FORWARD_MIN_SIDE = 8  # stride-1 k x k forward on maps at least this wide: XLA's conv (NOTES.md, attempt 7)
XLA_WEIGHT_GRAD_SIDES = (12, 28)  # its weight gradient on outputs with both sides in this range: XLA's (attempt 12)


def _xla_conv(x, kernel, stride: int, padding: int):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _im2col(x, k: int, padding: int, stride: int = 1):
    """(n, ho, wo, k*k*c): the k*k (strided) shifted views of the zero-padded x side by side, offset-major."""
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0)])
    return jnp.concatenate(_shifted_slices(x, k, stride), axis=-1)


def _im2col_weight_grad(x, dy, k: int, padding: int, stride: int = 1, acc=None):
    """im2col(x)^T dy, (k*k*C, O): a convolution's weight gradient as one 2-D dot (rows contracted)."""
    cols = _im2col(x, k, padding, stride).reshape(-1, k * k * x.shape[-1])
    return jax.lax.dot_general(cols, dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())),
                               preferred_element_type=acc)


def conv2d(x, kernel, stride: int, padding: int, impl: str = "xla"):
    """NHWC x HWIO convolution. "xla": lax.conv_general_dilated, forward and backward. "slices": a 1x1 conv is
    one dot over channels; a stride-1 k x k conv (`_conv_kxk`) has a backward made of dots on the k*k shifted
    views, which XLA:CPU runs faster than its convolution backward (benchmarks/NOTES.md, attempts 1 and 7).
    A strided conv (conv1) keeps XLA's convolution but for its weight gradient (`_conv_strided`)."""
    if impl == "xla":
        return _xla_conv(x, kernel, stride, padding)
    if stride > 1:
        return _conv_strided(x, kernel, stride, padding)
    k = kernel.shape[0]
    if k == 1 and padding == 0:
        return _matmul(x, kernel[0, 0])
    return _conv_kxk(x, kernel, padding)


def _matmul(x, w):
    """(..., C) @ (C, O) as a 2-D dot. Its autodiff weight gradient is then a 2-D dot contracting rows,
    which XLA:CPU runs at 1.4-1.8x the speed of the same contraction over a 4-D array's (N, H, W) axes (that
    one transposes the operand first; benchmarks/NOTES.md, attempt 8)."""
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


STRIDED_WEIGHT_GRAD_IMAGES = 2  # images per chunk of the strided conv's weight gradient (attempt 16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_strided(x, kernel, stride: int, padding: int):
    """Strided convolution (conv1, 7x7/2 on the image): XLA's convolution forward and for the input gradient.
    The weight gradient is im2col(x)^T dy summed over chunks of STRIDED_WEIGHT_GRAD_IMAGES images in a scan,
    so each chunk's im2col stays in cache: XLA:CPU's own was 2x slower, and one im2col of the whole batch
    (147 columns of 3 channels each) costs more than the dot. With more than one device, XLA's (the scan
    would gather a batch sharded over devices onto each of them)."""
    return _xla_conv(x, kernel, stride, padding)


def _conv_strided_fwd(x, kernel, stride, padding):
    return _conv_strided(x, kernel, stride, padding), (x, kernel)


def _conv_strided_bwd(stride, padding, res, dy):
    x, kernel = res
    conv = functools.partial(_xla_conv, stride=stride, padding=padding)
    if jax.device_count() > 1:
        return jax.vjp(conv, x, kernel)[1](dy)
    dx = jax.vjp(lambda v: conv(v, kernel), x)[1](dy)[0]  # jit drops it: conv1's input is the image
    k, _, c, o = kernel.shape
    n = x.shape[0]
    per = max((d for d in range(1, min(n, STRIDED_WEIGHT_GRAD_IMAGES) + 1) if n % d == 0), default=1)
    acc = jnp.promote_types(dy.dtype, jnp.float32)

    def chunk(total, xd):
        return total + _im2col_weight_grad(*xd, k, padding, stride, acc), None

    chunks = (x.reshape(n // per, per, *x.shape[1:]), dy.reshape(n // per, per, *dy.shape[1:]))
    dk = jax.lax.scan(chunk, jnp.zeros((k * k * c, o), acc), chunks)[0]
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_strided.defvjp(_conv_strided_fwd, _conv_strided_bwd)


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], dtype: Dtype):
    """module.param, minus flax's check of an existing parameter by tracing its initialiser under
    jax.eval_shape: for this network's truncated-normal initialisers that check is about 0.45 s of every
    trace of the train step (a fifth of it). The same shape check is made directly, with flax's error."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if tuple(value.shape) != tuple(shape):
            raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, tuple(value.shape), tuple(shape))
        return value
    return module.param(name, init, shape, dtype)


class Conv(nn.Module):
    """2-D convolution with an HWIO `kernel` (and optional `bias`), torch-style symmetric padding."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = False
    init: str = "torchvision"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        kernel_init, bias_init = _initializers(self.init)
        kernel = _param(self, "kernel", kernel_init, (k, k, cin, self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = conv2d(x, kernel, self.stride, self.padding, self.impl)
        if self.use_bias:
            init = _torch_uniform_bias(k * k * cin) if bias_init == "torch_uniform" else nn.initializers.zeros
            y = y + _param(self, "bias", init, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class Dense(nn.Module):
    """Fully connected layer with the variant's initialisation (flax's Dense has no torch-style bias init)."""

    features: int
    init: str = "torchvision"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel_init, bias_init = _initializers(self.init)
        fan_in = x.shape[-1]
        kernel = _param(self, "kernel", kernel_init, (fan_in, self.features), self.param_dtype)
        binit = _torch_uniform_bias(fan_in) if bias_init == "torch_uniform" else nn.initializers.zeros
        bias = _param(self, "bias", binit, (self.features,), self.param_dtype)
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class BatchNorm(nn.Module):
    """torch's BatchNorm2d(eps=1e-3) over the last axis, with flax's names (`scale`, `bias`; `batch_stats`
    `mean`, `var`). Unlike flax's BatchNorm, the running variance is updated with the unbiased batch variance,
    as torch does: flax keeps the biased one, which differs by n/(n-1) (3% on the aux heads' 4x4 maps at batch 2)."""

    momentum: float = 0.9  # torch's momentum 0.1 updates running = 0.9 * running + 0.1 * batch
    epsilon: float = 1e-3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        c = x.shape[-1]
        f32 = jnp.promote_types(jnp.float32, self.param_dtype)  # statistics in float32 at least, as flax's
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), f32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), f32))
        scale = _param(self, "scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = _param(self, "bias", nn.initializers.zeros, (c,), self.param_dtype)
        if train:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(f32)
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            if not self.is_initializing():
                n = x.size // c
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale.astype(f32) * jax.lax.rsqrt(var + self.epsilon)
        return (x.astype(self.dtype) - mean.astype(self.dtype)) * mul.astype(self.dtype) + bias.astype(self.dtype)


class BasicConv(nn.Module):
    """conv -> [BatchNorm] -> ReLU; submodules `conv` and `bn` as in torchvision's BasicConv2d."""

    features: int
    kernel_size: int
    variant: Variant
    stride: int = 1
    padding: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x, *, train: bool):
        v = self.variant
        x = Conv(self.features, self.kernel_size, self.stride, self.padding, use_bias=not v.batch_norm,
                 init=v.init, dtype=self.dtype, param_dtype=self.param_dtype, impl=self.impl,
                 name="conv")(x)
        if v.batch_norm:
            x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x, train=train)
        return nn.relu(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _window_max(xp, window: int, stride: int):
    """Max over window x window windows of an already padded NHWC xp, as the maximum of shifted slices."""
    return functools.reduce(jax.lax.max, _shifted_slices(xp, window, stride))


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
        hit = jax.lax.eq(_strided_view(xp, i, j, stride, ho, wo), y)
        idx = jax.lax.select(hit, jax.lax.full(y.shape, k, dtype), idx)
    return idx


def _window_max_bwd(window, stride, res, g):
    """Each output's gradient goes to the first input of its window (row-major) equal to the maximum, torch's
    max_pool2d rule. The gradient and the argmax are spread back to input positions once (interior padding by
    the stride, edge padding by the window) and every input sums the window*window shifted views that can reach
    it: one elementwise pass that XLA fuses. Differentiating the jnp.maximum chain instead splits ties and costs
    a select and a divide per offset."""
    xp, y = res
    n, h, w, c = xp.shape
    ho, wo = y.shape[1:3]
    cfg = [(0, 0, 0), (window - 1, h - stride * (ho - 1) - 1, stride - 1),
           (window - 1, w - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)]
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


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


def max_pool(x, window: int, stride: int, mode: str, pad: int = 0, impl: str = "xla"):
    """Max pool over H and W with torch's ceil/floor mode or TensorFlow's SAME, padding with -inf.

    "xla": reduce_window, whose backward XLA:CPU expands into iota, reduce-window and scatter (a third of the
    train step). "slices": the elementwise maximum of the shifted slices, with a custom backward that routes
    each gradient to the window's first maximum (torch's rule, tested on ties) in one fused elementwise pass;
    forward+backward 3-25x faster than reduce_window's on this CPU (benchmarks/NOTES.md, attempt 4).
    """
    pads = [_pool_padding(n, window, stride, pad, mode) for n in x.shape[1:3]]
    if impl == "xla":
        return nn.max_pool(x, (window, window), (stride, stride), padding=pads)
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


def local_response_norm(x, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """Across-channel LRN as torch.nn.LocalResponseNorm and Caffe compute it (alpha divided by size)."""
    sq = jax.lax.reduce_window(jnp.square(x), 0.0, jax.lax.add, (1, 1, 1, size), (1, 1, 1, 1),
                               [(0, 0), (0, 0), (0, 0), (size // 2, (size - 1) // 2)])
    return x / (k + alpha / size * sq) ** beta


# ----------------------------------------------------------------------------------------------- blocks


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->"5x5" | 3x3 max pool->1x1."""

    spec: tuple[int, int, int, int, int, int]
    variant: Variant
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x, *, train: bool):
        ch1, ch3r, ch3, ch5r, ch5, pool_proj = self.spec
        v = self.variant
        conv = lambda f, k, name: BasicConv(f, k, v, padding=k // 2, dtype=self.dtype,  # noqa: E731
                                            param_dtype=self.param_dtype, impl=self.impl, name=name)
        b1 = conv(ch1, 1, "branch1")(x, train=train)
        b2 = conv(ch3, 3, "branch2_1")(conv(ch3r, 1, "branch2_0")(x, train=train), train=train)
        # torchvision's "5x5" branch is a 3x3 conv, a known deviation from the paper (pytorch/vision#906).
        k5 = v.branch3_kernel
        b3 = conv(ch5, k5, "branch3_1")(conv(ch5r, 1, "branch3_0")(x, train=train), train=train)
        # stride-1 3x3 pool with padding 1 keeps the size in every mode; torch index 0 is this pool.
        p = max_pool(x, 3, 1, "ceil" if v.pool_mode == "same" else v.pool_mode, pad=1, impl=self.impl)
        if v.branch4_relu:
            p = nn.relu(p)  # the write-up's ReLU after the pool; a no-op on ReLU outputs, kept to be exact
        b4 = conv(pool_proj, 1, "branch4_1")(p, train=train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: pool -> 1x1 conv 128 -> fc1 1024 -> ReLU -> dropout -> fc2."""

    num_classes: int
    variant: Variant
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x, *, train: bool):
        v = self.variant
        if v.aux_pool == "adaptive4":
            x = adaptive_avg_pool(x, 4)  # N x 4 x 4 x C on any input
        else:
            x = nn.avg_pool(x, (5, 5), (3, 3))  # N x 4 x 4 x C from 14x14 (paper), 3 x 3 from 12x12 (writeup)
        x = BasicConv(128, 1, v, dtype=self.dtype, param_dtype=self.param_dtype, impl=self.impl,
                      name="conv")(x, train=train)
        # NHWC flatten; the converter permutes fc1's rows from torch's NCHW order.
        x = x.reshape(x.shape[0], -1)
        dense = lambda f, name: Dense(f, v.init, self.dtype, self.param_dtype, name=name)  # noqa: E731
        if v.aux_dropout_before_fc1:
            x = nn.Dropout(v.aux_dropout, deterministic=not train)(x)
        x = nn.relu(dense(1024, "fc1")(x))
        x = nn.Dropout(v.aux_dropout, deterministic=not train)(x)
        return dense(self.num_classes, "fc2")(x)


# ----------------------------------------------------------------------------------------------- network


class GoogLeNet(nn.Module):
    """Inception v1 on NHWC images.

    `__call__(x, *, train)`: eval gives logits [N, num_classes]; train gives `GoogLeNetOutputs(logits, aux1,
    aux2)` (aux None when `aux_logits=False`), updates `batch_stats` (apply with `mutable=["batch_stats"]`) and
    needs a "dropout" rng. `init(rng, x)` creates every parameter, the aux heads included.
    `features(x, *, train=False)`: a dict of the named stage outputs and the pooled 1024-d `pre_logits`.
    """

    variant: Variant = VARIANTS["torchvision"]
    num_classes: int = 1000
    in_channels: int = 3
    aux_logits: bool = True
    transform_input: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def _forward(self, x, train: bool, heads: bool):
        v = self.variant
        want_aux = self.aux_logits and heads and (train or self.is_initializing())
        _check_input(v, x.shape, self.in_channels, want_aux)
        impl = resolve_impl(self.impl)
        kw = dict(variant=v, dtype=self.dtype, param_dtype=self.param_dtype, impl=impl)
        feats = {}
        if self.transform_input:
            # torchvision: undo ImageNet normalisation, redo it as (x - 0.5) / 0.5, the weights' original input.
            mean, std = jnp.array(IMAGENET_MEAN), jnp.array(IMAGENET_STD)
            x = x * (std / 0.5) + (mean - 0.5) / 0.5
        # N x 224 x 224 x C
        x = BasicConv(64, 7, stride=2, padding=3, name="conv1", **kw)(x, train=train)
        # N x 112 x 112 x 64; ceil-mode pools (torchvision) give 56 here, floor (writeup) 55
        x = max_pool(x, 3, 2, v.pool_mode, impl=impl)
        if v.stem_lrn:
            x = local_response_norm(x)
        x = BasicConv(64, 1, name="conv2", **kw)(x, train=train)
        x = BasicConv(192, 3, padding=1, name="conv3", **kw)(x, train=train)
        if v.stem_lrn:
            x = local_response_norm(x)
        # N x 56 x 56 x 192
        x = max_pool(x, 3, 2, v.pool_mode, impl=impl)
        feats["stem"] = x
        # N x 28 x 28 x 192
        aux = {}
        for name, *spec in INCEPTION_TABLE:
            if name == "inception4a":
                # N x 28 x 28 x 480 -> N x 14 x 14 x 480
                x = max_pool(x, 3, 2, v.pool_mode, impl=impl)
            if name == "inception5a":
                # N x 14 x 14 x 832 -> N x 7 x 7 x 832. torchvision: 2x2/2; paper 3x3/2; the write-up pools
                # twice with 3x3/2 (14 -> 6 -> 2 at 224 input).
                for window, stride in v.maxpool4:
                    x = max_pool(x, window, stride, v.pool_mode, impl=impl)
            x = Inception(tuple(spec), name=name, **kw)(x, train=train)
            feats[name] = x
            for head, after in AUX_AFTER.items():
                if after == name and want_aux:
                    # aux1 reads N x 14 x 14 x 512, aux2 N x 14 x 14 x 528
                    aux[head] = InceptionAux(self.num_classes, name=head, **kw)(x, train=train)
        # N x 7 x 7 x 1024
        x = jnp.mean(x, axis=(1, 2))
        feats["pre_logits"] = x
        if not heads:
            return feats, None, {}
        x = nn.Dropout(v.dropout, deterministic=not train)(x)
        logits = Dense(self.num_classes, v.init, self.dtype, self.param_dtype, name="fc")(x)
        # N x num_classes
        return feats, logits, aux

    def __call__(self, x, *, train: bool | None = None):
        if train is None:
            if not self.is_initializing():
                raise TypeError("GoogLeNet.__call__ needs train=True or train=False")
            train = False
        _, logits, aux = self._forward(x, train, heads=True)
        out = jnp.promote_types(jnp.float32, self.dtype)  # float32 at least: bfloat16 up, float64 kept
        cast = lambda a: None if a is None else a.astype(out)  # noqa: E731
        if not train:
            return cast(logits)
        return GoogLeNetOutputs(cast(logits), cast(aux.get("aux1")), cast(aux.get("aux2")))

    def features(self, x, *, train: bool = False) -> dict[str, jax.Array]:
        """Named stage outputs (`stem`, `inception3a` ... `inception5b`) and the pooled 1024-d `pre_logits`."""
        feats, _, _ = self._forward(x, train, heads=False)
        return feats


def googlenet(variant: str = "torchvision", *, num_classes: int = 1000, in_channels: int = 3,
              aux_logits: bool = True, transform_input: bool = False, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32, impl: str = "auto") -> GoogLeNet:
    """Build a GoogLeNet.

    Args:
      variant: "torchvision" (torchvision 0.29, the pretrained weights' architecture), "paper" (Table 1 of
        arXiv:1409.4842) or "writeup" (the write-up's MNIST model). See `VARIANTS`.
      num_classes: classifier outputs (main and aux heads).
      in_channels: input channels (1 for MNIST).
      aux_logits: build the two auxiliary heads (used in training mode only).
      transform_input: torchvision's option for its pretrained weights: takes ImageNet-normalised RGB input.
      dtype: computation dtype (bfloat16 for mixed precision); logits are returned in float32 (float64 if
        dtype is float64).
      param_dtype: parameter dtype.
      impl: how convolutions and max pools are computed: "xla" (XLA's convolution and reduce_window,
        autodiff backward), "slices" (1x1 convs as dots; k x k stride-1 convs with a backward of dots and
        XLA's convolution forward on maps of 8x8 and more; max pools as maxima of shifted slices with a
        first-maximum backward), or "auto" ("slices" on the CPU, where it runs faster, "xla" elsewhere).
        The parameters and the results are the same either way (up to float rounding order).

    Returns:
      A `GoogLeNet` flax.linen Module taking NHWC images.
    """
    v = check_variant(variant)
    if transform_input and in_channels != 3:
        raise ValueError("transform_input needs in_channels=3 (it re-normalises RGB for torchvision's weights)")
    resolve_impl(impl)  # fail early on a typo
    return GoogLeNet(v, num_classes, in_channels, aux_logits, transform_input, dtype,
                     param_dtype, impl)
