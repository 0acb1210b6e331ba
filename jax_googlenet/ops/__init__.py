"""Convolution, pooling and normalisation kernels of the network, apart from its architecture.

- `plan.py`: which kernel computes each layer (by kind, shape, dtype, backend, `impl` and mode) and the XLA
  options the steps compile with, each rule with its measured reason; `python -m jax_googlenet.ops` prints it.
- `conv.py`: the convolution kernels (XLA's, 1x1 dots, stride-1 k x k with a backward of dots, dense products).
- `winograd.py`: Winograd's F(m x m, r x r) convolution, its transforms and its backward.
- `merged.py`: an inception block's three 1x1 convolutions of its input as one product.
- `pool.py`: max pool (torch ceil/floor mode or TensorFlow SAME) as reduce_window or shifted slices,
  `adaptive_avg_pool`, pool output sizes.
- `norm.py`: `batch_norm_train` (batch norm's statistics, forward and backward in two passes each),
  torch's running statistics and `local_response_norm` (the paper variant's LRN).
- `windows.py`: the shifted strided views that the slices kernels are built from.

`conv2d` and `max_pool` compute one layer with the kernel the plan chooses for it; tests/test_ops.py checks each
kernel against torch.
"""

from __future__ import annotations

from jax_googlenet.ops import plan
from jax_googlenet.ops.norm import local_response_norm
from jax_googlenet.ops.plan import (ELEMENTAL_EMITTERS, ELEMENTAL_EMITTERS_MIN_SIDE, IMPLS, XLA_KERNELS,
                                    XLA_KERNELS_MIN_SIDE, compiler_options, resolve_impl, xla_kernels)
from jax_googlenet.ops.pool import adaptive_avg_pool, pool_output_size


def conv2d(x, kernel, stride: int, padding: int, impl: str = "xla", mode: str = "train"):
    """NHWC x HWIO convolution with symmetric `padding`, by the kernel `plan.conv` chooses for `impl` ("xla",
    "slices" or "winograd") and this shape and dtype."""
    return plan.conv(x.shape, kernel.shape, stride, padding, x.dtype, impl, mode).run(x, kernel)


def max_pool(x, window: int, stride: int, mode: str, pad: int = 0, impl: str = "xla"):
    """Max pool over H and W with torch's ceil/floor mode or TensorFlow's SAME (`mode`), padding with -inf, by
    the kernel `plan.max_pool` chooses for `impl`."""
    return plan.max_pool(x.shape, window, stride, mode, pad, impl).run(x)


__all__ = ["ELEMENTAL_EMITTERS", "ELEMENTAL_EMITTERS_MIN_SIDE", "IMPLS", "XLA_KERNELS", "XLA_KERNELS_MIN_SIDE",
           "adaptive_avg_pool", "compiler_options", "conv2d", "local_response_norm", "max_pool", "plan",
           "pool_output_size", "resolve_impl", "xla_kernels"]
