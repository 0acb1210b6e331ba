"""Which kernel computes each layer of the network, and the options its steps compile with.

This module is the one place where an implementation is chosen. A layer is asked for by kind (`conv`, `max_pool`,
`merged_1x1`: an inception block's three 1x1 convolutions of its input), its input shape, dtype, the user's
`impl` and the mode:
- "train": the train step, forward and backward;
- "eval": inference with BatchNorm's running statistics, forward only;
- "folded": inference with each convolution and its BatchNorm folded into one convolution with a bias
  (`jax_googlenet.fold`): a conv's kernel computes relu(conv(x) + bias), the bias and ReLU in the convolution's
  own output pass where the kernel has one (Winograd's output transform).
The answer is a `Kernel`: the names of its forward and backward and the function that computes the layer. The
rules below say the measured reason for each choice (benchmarks/NOTES.md, the project's 2-core CPU, float32).
`python -m jax_googlenet.ops --image-size 224 --batch-size 16` prints the choices layer by layer
(`network_plan`, `table`).

`impl` is the user's choice (`googlenet(impl=...)`): "xla" (XLA's convolution and reduce_window, autodiff
backward), "slices" (dots on shifted views of the padded map, with custom backward passes), "winograd" ("slices"
with Winograd's and dense products for the stride-1 convolutions, fewer multiplications), or "auto"
(`resolve_impl`). All give the same parameters and the same results up to float rounding.

Adding a kernel: its module in `jax_googlenet/ops/`, a rule in `conv` or `max_pool` here with its measured
reason, and a test against torch in tests/test_ops.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jax_googlenet.ops import conv as conv_ops
from jax_googlenet.ops import merged as merged_ops
from jax_googlenet.ops import pool as pool_ops
from jax_googlenet.ops import winograd as winograd_ops

IMPLS = ("auto", "xla", "slices", "winograd")
MODES = ("train", "eval", "folded")
BACKENDS = ("cpu", "gpu")


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """The kernels' family for `impl` on `backend` (default: JAX's): "auto" is "winograd" on the CPU, where
    XLA:CPU runs the train step fastest with it (benchmarks/NOTES.md, "Winograd convolution"), and "xla"
    elsewhere (cuDNN has its own kernels, Winograd's included)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "winograd" if (backend or jax.default_backend()) == "cpu" else "xla"
    return impl


@dataclasses.dataclass(frozen=True)
class Kernel:
    """What computes a layer: `run` (a conv's `run(x, kernel)`, in "folded" mode `run(x, weights, bias)` with the
    ReLU; a pool's `run(x)`; the merged 1x1's `run(module, x, branches, ...)`) and the names of its forward and
    backward. A conv whose kernel multiplies by a transform of its weights has `prepare`, kernel -> that
    transform: in "folded" mode `run` takes `prepare(kernel)` (else the kernel itself), which inference computes
    once per set of variables (`jax_googlenet.fold.prepare`); `_conv`'s kernels also have `product(x, weights)`,
    the layer on prepared weights."""

    forward: str
    backward: str
    run: Callable
    prepare: Callable | None = None
    product: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One layer of a plan: its name (the Flax module path, or the pool's torchvision name), kind, input shape
    (NHWC), operation, the kernels of its forward and (in training) backward, and the operation's arguments
    (`spec`: a conv's k, features, stride, padding; a pool's window, stride, mode, pad)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    op: str
    forward: str
    backward: str
    spec: tuple[tuple[str, object], ...] = ()


_RECORD: contextvars.ContextVar[list[Row] | None] = contextvars.ContextVar("plan_record", default=None)


@contextlib.contextmanager
def recording():
    """Collects the `Row` of every layer asked for inside the block (as a model traces) into the list it yields."""
    rows: list[Row] = []
    token = _RECORD.set(rows)
    try:
        yield rows
    finally:
        _RECORD.reset(token)


def _answer(kernel: Kernel, mode: str, name: str | None, kind: str, shape, op: str, spec: dict) -> Kernel:
    """`kernel`, its row recorded where `recording` is on."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    rows = _RECORD.get()
    if rows is not None:
        rows.append(Row(name or "?", kind, tuple(shape), op, kernel.forward,
                        kernel.backward if mode == "train" else "-", tuple(spec.items())))
    return kernel


# ----------------------------------------------------------------------------------------------- convolutions

# Stride-1 k x k forward on maps at least this wide: XLA's convolution; below it one im2col dot, where XLA's
# convolution is 3-10x slower on 2x2 maps (NOTES.md, "XLA's convolution for the forward, dots for the backward").
XLA_FORWARD_MIN_SIDE = 8
# Its weight gradient on outputs with both sides in this range: XLA's convolution backward, 1.3-2.6x faster than
# the im2col dot there and 1.8x slower at 56x56 (NOTES.md, "XLA's convolution backward for the weight gradient
# on outputs 12 to 28 wide").
XLA_WEIGHT_GRAD_SIDES = (12, 28)
# Winograd's F(m x m, k x k) for stride-1 k x k convolutions: the first m listed whose tiles divide the output
# map (no padded tiles). In the train step at 224, 96 and 32 that is F(4x4, 3x3) on 56, 28, 24, 12 and 8 and
# F(2x2, 3x3) on 14 and 6; the 7x7 maps (two tiles of 4 for 7 outputs) and the 5x5 convolutions run faster
# without it (NOTES.md, "Winograd convolution").
WINOGRAD = {3: (4, 2)}
# ... and only with at least this many input channels: the inception blocks' narrow third-branch 3x3
# convolutions (16 to 48 channels in) stay on `conv_kxk`, which keeps 5 s off the 16/224 train step's compile
# for ~2% of its speed (NOTES.md, "Winograd convolution").
WINOGRAD_MIN_CHANNELS = 64


def winograd_tile(k: int, ho: int, wo: int, c: int) -> int | None:
    """m of F(m x m, k x k) for a stride-1 k x k convolution of c input channels with ho x wo outputs, or None."""
    if c < WINOGRAD_MIN_CHANNELS:
        return None
    return next((m for m in WINOGRAD.get(k, ()) if ho % m == 0 and wo % m == 0), None)


def conv(x_shape, kernel_shape, stride: int, padding: int, dtype, impl: str, mode: str = "train",
         name: str | None = None) -> Kernel:
    """The kernel for an NHWC x HWIO convolution of an `x_shape` input computed in `dtype`: `run(x, kernel)`, in
    "folded" mode `run(x, kernel, bias)`, which applies the bias and the ReLU."""
    k, _, c, o = kernel_shape
    op = f"conv {k}x{k}/{stride} -> {o}"
    kernel, m = _conv(x_shape, kernel_shape, stride, padding, dtype, impl)
    if mode == "folded":
        # The weights' transforms (Winograd's U = G g G^T, the dense product's operator) are prepared once per
        # set of variables: computed in the step they were 30% of the 64/32 eval step's kernel time and 8-10%
        # at 96 and 224 pixels (benchmarks/NOTES.md, "The weights' transforms out of the step").
        op += " + bias, ReLU"
        if m is not None:  # Winograd's output transform is an elementwise pass of its own: they join it
            kernel = Kernel(f"{kernel.forward} + bias, ReLU in its output transform", "-",
                            lambda x, u, b: winograd_ops.winograd_bias_relu(x, u, b, padding, m),
                            prepare=lambda kern: winograd_ops.winograd_weights(kern, m))
        else:
            # XLA:CPU's convolution and dot kernels take no epilogue: XLA fuses the bias and ReLU into one
            # elementwise pass over the product's output
            product = kernel.product or kernel.run
            kernel = Kernel(f"{kernel.forward}; bias, ReLU after", "-",
                            lambda x, weights, b: jax.nn.relu(product(x, weights) + b), prepare=kernel.prepare)
    return _answer(kernel, mode, name, "conv", x_shape, op, dict(k=k, features=o, stride=stride, padding=padding))


def _conv(x_shape, kernel_shape, stride: int, padding: int, dtype, impl: str) -> tuple[Kernel, int | None]:
    """(the convolution's kernel, m of Winograd's F(m x m, k x k) or None): `conv`'s rules."""
    k, _, c, o = kernel_shape
    h, w = x_shape[1:3]
    xla = Kernel("xla conv", "xla conv (autodiff)", lambda x, kern: conv_ops.xla_conv(x, kern, stride, padding))
    if impl == "xla":
        return xla, None
    if stride > 1:
        # conv1 (7x7/2 on the image): XLA's convolution, forward and backward, the fastest kernel measured for
        # it in the train step (NOTES.md, "XLA's own dots, conv1's weight gradient, batch norm's statistics,
        # the strided pools' backward")
        return xla, None
    if k == 1 and padding == 0:
        return Kernel("dot", "dots (autodiff)", conv_ops.conv_1x1), None
    if impl == "winograd":
        if h * w < k * k:
            # maps of fewer than k*k positions (3x3 on 2x2 and 1x1): the operator's nonzero blocks as one product
            ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
            return Kernel("dense product", "dots (autodiff)", lambda x, kern: conv_ops.conv_dense(x, kern, padding),
                          prepare=lambda kern: conv_ops.dense_operator(kern, h, w, padding),
                          product=lambda x, dense: conv_ops.dense_product(x, dense, ho, wo)), None
        m = winograd_tile(k, h + 2 * padding - k + 1, w + 2 * padding - k + 1, c)
        # not in bfloat16, whose rounding error Winograd's transforms would multiply
        if m is not None and jnp.finfo(dtype).nmant >= jnp.finfo(jnp.float32).nmant:
            label = f"winograd F({m}x{m},{k}x{k})"
            return Kernel(label, label, lambda x, kern: winograd_ops.conv_winograd(x, kern, padding, m)), m
    # stride-1 k x k: XLA:CPU's convolution backward is the slow part of the train step, so dots on shifted views
    forward = "xla" if min(h, w) >= XLA_FORWARD_MIN_SIDE else "im2col"
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    lo, hi = XLA_WEIGHT_GRAD_SIDES
    weight_grad = "xla" if lo <= min(ho, wo) and max(ho, wo) <= hi else "im2col"
    return Kernel("xla conv" if forward == "xla" else "im2col dot",
                  f"{weight_grad} weight grad + shifted-view input grad",
                  lambda x, kern: conv_ops.conv_kxk(x, kern, padding, forward, weight_grad)), None


_SEPARATE_1X1: contextvars.ContextVar[bool] = contextvars.ContextVar("plan_separate_1x1", default=False)


@contextlib.contextmanager
def separate_1x1():
    """Inside the block, `merged_1x1` merges nothing: each 1x1 convolution runs with its own BatchNorm (the
    recalibration's forward, which reads every BatchNorm's input; `jax_googlenet.recalibrate`)."""
    token = _SEPARATE_1X1.set(True)
    try:
        yield
    finally:
        _SEPARATE_1X1.reset(token)


def merged_1x1(x_shape, features, impl: str, mode: str, name: str | None = None) -> Kernel | None:
    """The kernel computing an inception block's three 1x1 convolutions of its input (`features` outputs each)
    as one product (`jax_googlenet.ops.merged`), or None: each on its own, as `conv` says.

    Merged in training on the CPU's kernels: the train step +1.5% at 16/224, +6% at 64/96, +2.3% at 64/32. The
    eval forward runs the same at 224 and 96 and 30% slower at 32, so inference keeps the three (NOTES.md, "The
    inception block's 1x1 products merged, XLA's elemental emitters")."""
    if mode != "train" or impl not in ("slices", "winograd") or _SEPARATE_1X1.get():
        return None
    op = "conv 1x1/1 -> " + "+".join(str(f) for f in features)
    return _answer(Kernel("merged dot", "dots (autodiff)", merged_ops.merged_1x1), mode, name, "conv", x_shape, op,
                   dict(k=1, features=sum(features), stride=1, padding=0))


# ----------------------------------------------------------------------------------------------- pools


def max_pool(x_shape, window: int, stride: int, pool_mode: str, pad: int, impl: str, mode: str = "train",
             name: str | None = None) -> Kernel:
    """The kernel for a max pool of an `x_shape` input (torch's ceil/floor `pool_mode` or TensorFlow's "same");
    `run(x)`.

    "slices" and "winograd": shifted slices with the first-maximum custom backward, where XLA:CPU expands
    reduce_window's autodiff backward into iota, reduce-window and scatter (a third of the train step): 1.38x
    the train step at 16/224 (NOTES.md, "A custom VJP for the slices max pool")."""
    op = f"max {window}x{window}/{stride}"
    args = dict(window=window, stride=stride, mode=pool_mode, pad=pad)
    if impl == "xla":
        kernel = Kernel("reduce_window", "reduce_window (autodiff)",
                        functools.partial(pool_ops.max_pool_reduce_window, **args))
    else:
        kernel = Kernel("shifted slices", "first-max spread" if stride > 1 else "first-max shifted views",
                        functools.partial(pool_ops.max_pool_slices, **args))
    return _answer(kernel, mode, name, "pool", x_shape, op, args)


# ----------------------------------------------------------------------------------------------- compile options

# XLA:CPU runs dots, convolutions and reductions as YNNPACK fusions by default. From 64x64 images in float32 XLA's
# own kernels run the network's dots and the convolutions left to XLA faster: conv1 at batch 16/224 in 30
# against 41 ms, the narrow 3x3 ones 1.1-1.9x faster, and with its own dots the 16/224 train step +3-6%, its eval
# forward +7-10%, the 64/96 eval forward +7%. Below 64 pixels YNNPACK's are faster (the 64/32 train step 6%; conv1
# on 64 MNIST digits 1.4 against 2.0 ms). Reductions stay YNNPACK's (XLA's cost the 16/224 train step 19%): the
# option lists the fusion kinds it keeps. Not in float64, where XLA's own convolution is a plain loop (5-10x
# slower), nor bfloat16, which YNNPACK's convolutions leave to XLA. Figures: benchmarks/NOTES.md, "XLA's own
# convolution kernels" and "XLA's own dots, conv1's weight gradient, batch norm's statistics, the strided pools'
# backward".
XLA_KERNELS_MIN_SIDE = 64
XLA_KERNELS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
# From 224-pixel images, the train step compiles with XLA:CPU's elemental loop emitters instead of its fusion
# emitters: the 16/224 train step compiles in 11.2-11.7 s against 13.1-13.6 at the same speed; at 96 pixels they
# run the train step 1-2% slower, at 32 pixels 10% (benchmarks/NOTES.md, "The inception block's 1x1 products
# merged, XLA's elemental emitters"). Not the folded inference step: at 16/224 the fusion emitters run it 4-18%
# faster (the median of alternated windows in four series), compile it in 3.5-4.1 s against 4.9-5.0, and give the
# same logits to the bit (NOTES.md, "Folded inference on the fusion emitters").
ELEMENTAL_EMITTERS_MIN_SIDE = 224
ELEMENTAL_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
STEPS = ("train", "inference")


def compiler_options(image_side: int, dtype="float32", backend: str | None = None, *,
                     step: str = "train") -> dict[str, object]:
    """`jax.jit`'s compiler_options for the network's steps on images `image_side` pixels wide computed in
    `dtype` on `backend` (default: JAX's): on the CPU in float32, XLA_KERNELS from XLA_KERNELS_MIN_SIDE and, for
    the train `step` (and the recalibration's forward), ELEMENTAL_EMITTERS as well from
    ELEMENTAL_EMITTERS_MIN_SIDE; for `step="inference"` (the folded eval step) never the elemental emitters; else
    none (and none that this jaxlib lacks). `xla_kernels` says which in words."""
    if step not in STEPS:
        raise ValueError(f"step must be 'train' or 'inference', not {step!r}")
    options = _choice(image_side, dtype, backend)[0]
    return options if step == "train" else {k: v for k, v in options.items() if k not in ELEMENTAL_EMITTERS}


def xla_kernels(image_side: int, dtype="float32", backend: str | None = None) -> str:
    """The jobs' and the benchmark's words for what `compiler_options` chose."""
    return _choice(image_side, dtype, backend)[1]


def _choice(image_side: int, dtype, backend: str | None) -> tuple[dict[str, object], str]:
    """(compiler options, their description) for `compiler_options` and `xla_kernels`."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return {}, f"XLA's default dot and convolution kernels ({backend})"
    if jnp.dtype(dtype) != jnp.float32 or image_side < XLA_KERNELS_MIN_SIDE:
        return {}, (f"XLA:CPU's default dot and convolution kernels (YNNPACK's in float32 below "
                    f"{XLA_KERNELS_MIN_SIDE} pixels)")
    if not _xla_accepts(tuple(XLA_KERNELS.items())):
        return {}, "XLA:CPU's default dot and convolution kernels (this jaxlib has no YNNPACK fusion option)"
    words = f"XLA's own dot and convolution kernels (CPU, float32, images from {XLA_KERNELS_MIN_SIDE} pixels)"
    if image_side < ELEMENTAL_EMITTERS_MIN_SIDE:
        return dict(XLA_KERNELS), words
    if not _xla_accepts(tuple(ELEMENTAL_EMITTERS.items())):
        return dict(XLA_KERNELS), words + "; this jaxlib has no option for XLA:CPU's elemental loop emitters"
    return {**XLA_KERNELS, **ELEMENTAL_EMITTERS}, (words + f"; XLA:CPU's elemental loop emitters for training "
                                                   f"(images from {ELEMENTAL_EMITTERS_MIN_SIDE} pixels)")


def accepts(options: dict[str, object]) -> bool:
    """Whether this jaxlib compiles with XLA `options` (experimental XLA:CPU options come and go), tried once."""
    return _xla_accepts(tuple(sorted(options.items())))


@functools.cache
def _xla_accepts(options: tuple[tuple[str, object], ...]) -> bool:
    """Whether this jaxlib compiles with `options` (experimental XLA:CPU options), tried once each."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:  # an unknown option or value
        return False
    return True


# ----------------------------------------------------------------------------------------------- inference chunks

# Folded inference on the CPU runs the stem as chunks of about this many input pixels, one after another
# (`jax_googlenet.fold.apply`), so each of its layers' outputs is a chunk's, not the batch's: 4 images at 224
# pixels, 16 at 96, the whole batch up to 256 images at 32. The eval step at 16/224 chunked by 4 ran 71.1 against
# 66.0 img/s, at 64/96 by 16 440.6 against 395.7 (by 8 404.1); at 64/32 chunks of 32 and 16 were 10-25% slower
# than the whole batch (benchmarks/NOTES.md, "Folded inference in chunks").
EVAL_CHUNK_PIXELS = 2 ** 18
# ... and the stages after the stem as chunks of about this many positions of the stem's output map: the whole
# batch at 16/224 (28 x 28 maps) and 64/96 (12 x 12), 16 images at 64/224. Against the stem's chunks all through,
# alternated in one process, per-window ratios' medians: 64/96 +8 and +9%, 16/224 +6%; at 64/224 chunks of 16
# ran as the whole batch (1.015) (NOTES.md, "The stages after the stem on more images at a time").
EVAL_AFTER_STEM_POSITIONS = 2 ** 14
EVAL_PARTS = {"stem": EVAL_CHUNK_PIXELS, "after_stem": EVAL_AFTER_STEM_POSITIONS}


def eval_chunk(batch: int, height: int, width: int, backend: str | None = None, *, part: str = "stem") -> int:
    """Images per chunk of folded inference's `part` ("stem" on height x width images, or "after_stem" on the
    stem's height x width output) for `batch` images on `backend` (default JAX's): the largest power of two
    whose positions stay within EVAL_PARTS[part] (at least 1), the whole batch where that is larger or off the
    CPU."""
    if part not in EVAL_PARTS:
        raise ValueError(f"part must be one of {', '.join(EVAL_PARTS)}, not {part!r}")
    if (backend or jax.default_backend()) != "cpu":
        return batch
    fits = max(1, EVAL_PARTS[part] // (height * width))
    return min(batch, 1 << (fits.bit_length() - 1))


# ----------------------------------------------------------------------------------------------- the network's plan


def network_plan(image_size: int, batch_size: int, *, mode: str = "train", variant: str = "torchvision",
                 impl: str = "auto", backend: str | None = None, dtype="float32", in_channels: int = 3) -> list[Row]:
    """The `Row` of every layer the network asks for, in forward order, from one abstract forward pass (nothing
    is computed).

    Args:
      image_size, batch_size: the input's side and batch.
      mode: "train", "eval" or "folded".
      variant, impl, dtype, in_channels: as `googlenet()` takes them.
      backend: "cpu" or "gpu" (default: JAX's); it decides what impl="auto" means.

    Returns:
      The rows, as `table` prints them.
    """
    from jax_googlenet.model import googlenet  # the model asks this module: imported here, not at the top

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    model = googlenet(variant, in_channels=in_channels, dtype=dtype, impl=resolve_impl(impl, backend))
    model = model.clone(folded=mode == "folded")
    x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, in_channels), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with recording() as rows:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=mode == "train", mutable=["batch_stats"],
                                                rngs={"dropout": jax.random.key(0)}), variables, x)
    return rows


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table: layer, input shape, operation, forward, backward."""
    head = ("layer", "input (NHWC)", "op", "forward", "backward")
    cells = [head] + [(r.name, "x".join(map(str, r.shape)), r.op, r.forward, r.backward) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells)
