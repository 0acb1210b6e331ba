"""Local response normalisation, the paper variant's (its Figure 3: after the stem's first pool and after conv3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def local_response_norm(x, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """Across-channel LRN as torch.nn.LocalResponseNorm and Caffe compute it (alpha divided by size)."""
    sq = jax.lax.reduce_window(jnp.square(x), 0.0, jax.lax.add, (1, 1, 1, size), (1, 1, 1, 1),
                               [(0, 0), (0, 0), (0, 0), (size // 2, (size - 1) // 2)])
    return x / (k + alpha / size * sq) ** beta
