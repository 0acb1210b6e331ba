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
"""

from __future__ import annotations

import jax

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


__all__ = ["IMPLS", "adaptive_avg_pool", "conv2d", "local_response_norm", "max_pool", "pool_output_size",
           "resolve_impl"]
