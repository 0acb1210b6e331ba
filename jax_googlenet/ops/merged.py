"""An inception block's three 1x1 convolutions of its input (branch1, branch2_0, branch3_0) computed as one.

Their kernels side by side in one product, one batch norm (or bias) over its channels, ReLU, split: the same
parameters and results as calling each BasicConv. x is read once and its gradient is one product instead of
three summed. `jax_googlenet.ops.plan` says where it runs (the CPU's train step) and the measured reason.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jax_googlenet.ops.conv import conv_1x1
from jax_googlenet.ops.norm import batch_norm_train, update_running_stats


def merged_1x1(module: nn.Module, x, branches, dtype, batch_norm: bool, epsilon: float, momentum: float):
    """The BasicConvs `branches` ((name, features): submodules of `module` with a `conv` and, with `batch_norm`,
    a `bn`) applied to x in training, as one: their variables are read and the running statistics written
    through `module`'s scope, so they must exist already (this path is not taken at init)."""
    scopes = [module.scope.push(name) for name, _ in branches]
    offsets = np.cumsum([0] + [f for _, f in branches])  # each branch's first channel of the product
    convs = [s.push("conv") for s in scopes]
    concat = lambda group, col, name: jnp.concatenate([s.get_variable(col, name) for s in group])  # noqa: E731
    kernel = jnp.concatenate([c.get_variable("params", "kernel") for c in convs], axis=-1)
    y = conv_1x1(x.astype(dtype), kernel.astype(dtype))
    if not batch_norm:
        y = y + concat(convs, "params", "bias").astype(dtype)
    else:
        bns = [s.push("bn") for s in scopes]
        scale, bias = concat(bns, "params", "scale"), concat(bns, "params", "bias")
        y, mean, var = batch_norm_train(y, scale, bias, epsilon, dtype)
        for bn, lo, hi in zip(bns, offsets[:-1], offsets[1:]):
            running = update_running_stats(bn.get_variable("batch_stats", "mean"),
                                           bn.get_variable("batch_stats", "var"), mean[lo:hi], var[lo:hi],
                                           y.size // y.shape[-1], momentum)
            for name, value in zip(("mean", "var"), running):
                bn.put_variable("batch_stats", name, value)
    return jnp.split(nn.relu(y), offsets[1:-1], axis=-1)
