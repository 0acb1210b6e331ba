"""Convolution, pooling and normalisation kernels of the network, apart from its architecture.

Each op takes an `impl`: "xla" (XLA's convolution and reduce_window, autodiff backward), "slices" (dots on
shifted views of the padded map, with custom backward passes; `ops/conv.py` and `ops/pool.py` say where each
kernel is used and the measured reason), "winograd" ("slices" with Winograd's and dense products for the
stride-1 convolutions, fewer multiplications), or "auto": "winograd" on the CPU, where XLA:CPU runs the train
step fastest with it (benchmarks/NOTES.md, "Winograd convolution"), "xla" elsewhere (cuDNN has its own
kernels, Winograd's included). All give the same parameters and the same results up to float rounding;
tests/test_ops.py checks each against torch.

- `conv.py`: `conv2d`, NHWC x HWIO.
- `pool.py`: `max_pool` (torch ceil/floor mode or TensorFlow SAME), `adaptive_avg_pool`, pool output sizes.
- `norm.py`: `batch_norm_train` (batch norm's statistics, forward and backward in two passes each) and
  `local_response_norm` (the paper variant's LRN).
- `winograd.py`: Winograd's F(m x m, r x r) convolution, its transforms and its backward.
- `windows.py`: the shifted strided views that the slices kernels are built from.

`compiler_options` gives the XLA options the steps are jitted with: on the CPU, which libraries run the dots and
the convolutions left to XLA, chosen by image size; `xla_kernels` says it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_googlenet.ops.conv import conv2d
from jax_googlenet.ops.norm import local_response_norm
from jax_googlenet.ops.pool import adaptive_avg_pool, max_pool, pool_output_size

IMPLS = ("auto", "xla", "slices", "winograd")


def resolve_impl(impl: str) -> str:
    """"auto" is "winograd" on the CPU, where it trains fastest (benchmarks/NOTES.md), and "xla" elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "xla"
    return impl


# XLA:CPU runs dots, convolutions and reductions as YNNPACK fusions by default. From 64x64 images XLA's own
# kernels ran the network's dots and the convolutions left to XLA faster: its own convolutions conv1 at batch
# 16/224 in 30 against 41 ms and the narrow 3x3 ones 1.1-1.9x faster (H10), its own dots then added +3-6% to
# the 16/224 train step, +7-10% to its eval forward and +7% to the 64/96 eval forward (H13). Below 64 pixels
# both were slower (the 64/32 train step -6% with its dots; conv1 on 64 MNIST digits 2.0 against 1.4 ms).
# Reductions stay YNNPACK's (XLA's cost the 16/224 train step 19%): the option lists the fusion kinds it keeps.
# Not in float64, where XLA's own convolution is a plain loop (5-10x slower), nor bfloat16, which YNNPACK's
# convolutions leave to XLA. Figures: benchmarks/NOTES.md, H10 and H13.
XLA_KERNELS_MIN_SIDE = 64
XLA_KERNELS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
# From 224-pixel images, XLA:CPU's elemental loop emitters instead of its fusion emitters: the 16/224 train step
# compiled in 11.2-11.7 s against 13.1-13.6 at the same speed (+1.7% and -2% train, eval equal, two runs); at 96
# pixels train -1 to -2% (compile -1 s), at 32 pixels -10%. Figures: benchmarks/NOTES.md, H22.
ELEMENTAL_EMITTERS_MIN_SIDE = 224
ELEMENTAL_EMITTERS = {"xla_cpu_use_fusion_emitters": False}


def compiler_options(image_side: int, dtype="float32") -> dict[str, object]:
    """`jax.jit`'s compiler_options for the network's steps on images `image_side` pixels wide computed in
    `dtype`: on the CPU in float32, XLA_KERNELS from XLA_KERNELS_MIN_SIDE and ELEMENTAL_EMITTERS as well from
    ELEMENTAL_EMITTERS_MIN_SIDE, else none (and none that this jaxlib lacks). `xla_kernels` says which in words."""
    return _choice(image_side, dtype)[0]


def xla_kernels(image_side: int, dtype="float32") -> str:
    """The jobs' and the benchmark's words for what `compiler_options` chose."""
    return _choice(image_side, dtype)[1]


def _choice(image_side: int, dtype) -> tuple[dict[str, object], str]:
    """(compiler options, their description) for `compiler_options` and `xla_kernels`."""
    if jax.default_backend() != "cpu":
        return {}, f"XLA's default dot and convolution kernels ({jax.default_backend()})"
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
    return {**XLA_KERNELS, **ELEMENTAL_EMITTERS}, (words + f"; XLA:CPU's elemental loop emitters (images from "
                                                   f"{ELEMENTAL_EMITTERS_MIN_SIDE} pixels)")


@functools.cache
def _xla_accepts(options: tuple[tuple[str, object], ...]) -> bool:
    """Whether this jaxlib compiles with `options` (experimental XLA:CPU options), tried once each."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:  # an unknown option or value
        return False
    return True


__all__ = ["ELEMENTAL_EMITTERS", "ELEMENTAL_EMITTERS_MIN_SIDE", "IMPLS", "XLA_KERNELS", "XLA_KERNELS_MIN_SIDE",
           "adaptive_avg_pool", "compiler_options", "conv2d", "local_response_norm", "max_pool", "pool_output_size",
           "resolve_impl", "xla_kernels"]
