"""Flax layers of the network: the convolution and the max pool (computed by the kernel `jax_googlenet.ops.plan`
chooses), torch's BatchNorm, torch's initialisers, and a fully connected layer built from flax's `Dense` with
them."""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_googlenet.ops import plan
from jax_googlenet.ops.norm import batch_norm_apply, batch_norm_train, update_running_stats

Dtype = Any
Initializer = Callable[..., jax.Array]


def initializers(init: str, fan_in: int) -> tuple[Initializer, Initializer]:
    """(kernel, bias) initialisers of a conv or fc with `fan_in` inputs per output, for the variant's `init`:
    "torchvision", "torch_default" (PyTorch's layer defaults) or "he"."""
    if init == "torchvision":
        # torchvision: trunc_normal_(std=0.01, a=-2, b=2); a and b are absolute, i.e. +-200 std.
        kernel = nn.initializers.truncated_normal(0.01, lower=-200.0, upper=200.0)
    elif init == "torch_default":
        # torch's kaiming_uniform_(a=sqrt(5)) is U(+-1/sqrt(fan_in)); its bias the same bound.
        kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    else:
        return nn.initializers.he_normal(), nn.initializers.zeros
    bound = 1 / math.sqrt(fan_in)  # torch's bias init for Conv2d and Linear: U(+-1/sqrt(fan_in))
    return kernel, lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


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


# The variables' collection of weights prepared for folded inference's kernels (`Conv._prepared`).
PREPARED = "prepared"


class Conv(nn.Module):
    """2-D convolution with an HWIO `kernel` (and optional `bias`), torch-style symmetric padding; computed by
    the kernel `jax_googlenet.ops.plan` chooses for `impl`, the shape, dtype and `mode` ("train", "eval", or
    "folded": with the bias and a ReLU, relu(conv(x) + bias))."""

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
    def __call__(self, x, *, mode: str = "train"):
        k, cin = self.kernel_size, x.shape[-1]
        kernel_init, bias_init = initializers(self.init, k * k * cin)
        kernel = _param(self, "kernel", kernel_init, (k, k, cin, self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        chosen = plan.conv(x.shape, kernel.shape, self.stride, self.padding, x.dtype, self.impl, mode,
                           "/".join(self.scope.path[:-1]))
        if mode == "folded":  # the kernel adds the bias and applies the ReLU
            weights = kernel if chosen.prepare is None else self._prepared(chosen.prepare, kernel, x.shape)
            return chosen.run(x, weights, _param(self, "bias", bias_init, (self.features,), self.param_dtype)
                              .astype(self.dtype))
        y = chosen.run(x, kernel)
        if self.use_bias:
            y = y + _param(self, "bias", bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return y

    def _prepared(self, prepare, kernel, x_shape):
        """`prepare(kernel)`: the "prepared" collection's entry for this input size where the variables hold it
        (`jax_googlenet.fold.prepare`, which makes it by applying the model with the collection mutable), else
        computed here (`init` makes none)."""
        name = f"weights_{x_shape[1]}x{x_shape[2]}"
        if self.has_variable(PREPARED, name):
            weights, want = self.get_variable(PREPARED, name), jax.eval_shape(prepare, kernel)
            if weights.shape != want.shape:
                raise ValueError(f"{'/'.join(self.scope.path)}: the prepared weights {PREPARED}/{name} have shape "
                                 f"{weights.shape}, this kernel takes {want.shape}: prepare them with the model that "
                                 "applies them (jax_googlenet.fold.prepare)")
            return weights
        if self.is_mutable_collection(PREPARED) and not self.is_initializing():
            return self.variable(PREPARED, name, prepare, kernel).value
        if self.variables.get(PREPARED):
            raise ValueError(f"{'/'.join(self.scope.path)}: the prepared weights are for inputs of another size "
                             f"({', '.join(self.variables[PREPARED])}), not {x_shape[1]}x{x_shape[2]}; "
                             "prepare them for this image size (jax_googlenet.fold.prepare)")
        return prepare(kernel)


def max_pool(x, window: int, stride: int, pool_mode: str, *, pad: int = 0, impl: str, mode: str, name: str):
    """Max pool (torch's ceil/floor `pool_mode` or TensorFlow's "same") by the kernel `jax_googlenet.ops.plan`
    chooses; `name` is the layer's name in the plan."""
    return plan.max_pool(x.shape, window, stride, pool_mode, pad, impl, mode, name).run(x)


class RepeatedGridDense(nn.Module):
    """flax's Dense on the NHWC flatten of a `grid` x `grid` map whose every position repeats an input position
    (torch's adaptive average pool to a grid that the input's side divides, e.g. 2x2 -> 4x4 in the aux heads at
    32-pixel inputs), computed on the input's h x w x C flatten: the kernel's rows of each position's copies are
    summed first, a product with 1/r**2 of the rows (r = grid / side). The parameters are Dense's (the same
    names, shapes and initialisers), so the two are interchangeable; the gradient reaches every row through the
    sum."""

    features: int
    grid: int
    kernel_init: Initializer
    bias_init: Initializer
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: N x h x w x C, grid % h == grid % w == 0
        n, h, w, c = x.shape
        g = self.grid
        kernel = _param(self, "kernel", self.kernel_init, (g * g * c, self.features), self.param_dtype)
        bias = _param(self, "bias", self.bias_init, (self.features,), self.param_dtype)
        # Row (i, j, c) of the grid reads input position (i // (g / h), j // (g / w)).
        kernel = kernel.reshape(h, g // h, w, g // w, c, self.features).sum((1, 3)).reshape(h * w * c, -1)
        x, kernel, bias = nn.dtypes.promote_dtype(x.reshape(n, h * w * c), kernel, bias, dtype=self.dtype)
        return x @ kernel + bias


def dense(features: int, fan_in: int, init: str, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    """flax's Dense with the variant's torch-style initialisers (the bias bound needs `fan_in`)."""
    kernel_init, bias_init = initializers(init, fan_in)
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
                    name=name)


class BatchNorm(nn.Module):
    """torch's BatchNorm2d(eps=1e-3) over the last axis, with flax's names (`scale`, `bias`; `batch_stats`
    `mean`, `var`). Unlike flax's BatchNorm, the running variance is updated with the unbiased batch variance,
    as torch does: flax keeps the biased one, which differs by n/(n-1) (3% on the aux heads' 4x4 maps at batch 2)."""

    momentum: float = 0.9  # torch's momentum 0.1 updates running = 0.9 * running + 0.1 * batch
    epsilon: float = 1e-3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # How many times each position of x stands in the batch torch normalises (an aux head on the map its adaptive
    # pool repeats, `model.InceptionAux`): the mean and biased variance are the same, the count in the unbiased
    # running variance is x's times this.
    repeats: int = 1

    @nn.compact
    def __call__(self, x, *, train: bool):
        c = x.shape[-1]
        f32 = jnp.promote_types(jnp.float32, self.param_dtype)  # statistics in float32 at least, as flax's
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), f32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), f32))
        scale = _param(self, "scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = _param(self, "bias", nn.initializers.zeros, (c,), self.param_dtype)
        if train:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.dtype)
            if not self.is_initializing():
                ra_mean.value, ra_var.value = update_running_stats(ra_mean.value, ra_var.value, mean, var,
                                                                   x.size // c * self.repeats, self.momentum)
            return y
        return batch_norm_apply(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, self.dtype)

