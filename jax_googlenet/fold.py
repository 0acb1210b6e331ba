"""Folded inference: each convolution and the BatchNorm after it as one convolution with a bias.

In inference BatchNorm with running statistics is a per-channel affine map, y = (conv(x) - mean) * s + beta with
s = scale / sqrt(var + eps), which folds into the convolution exactly: kernel * s and bias beta - mean * s. Folding
once per set of variables, outside the step, leaves the step one convolution, its bias and its ReLU per layer,
computed by the kernels `jax_googlenet.ops.plan` chooses in its "folded" mode (Winograd's output transform adds
the bias and applies the ReLU in its own pass).

    model, folded_vars = fold(model, variables, (224, 224, 3))   # once per set of variables and image size
    logits = jax.jit(functools.partial(apply, model))(folded_vars, images)   # = model.apply(v, x, train=False)

`apply` computes the batch in chunks on the CPU: a few images at a time through the stem, more after it
(`plan.eval_chunk`). Given the image shape, `fold` also prepares (`prepare`) the weights the kernels multiply
by: Winograd's transformed filters and the small maps' dense operators, computed once here instead of in every
step.

The folded model computes what the unfolded one computes with `train=False` (up to float rounding: tests/
test_parity.py bounds it at 1e-5 relative for every variant) and stays differentiable with respect to its
input. The variants without BatchNorm ("paper", "writeup") have nothing to fold: their variables are used as
they are, and the fused bias and ReLU kernels still apply.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from jax_googlenet.layers import PREPARED, BatchNorm
from jax_googlenet.model import GoogLeNet
from jax_googlenet.ops import plan


def fold_batch_norm_flat(flat: Mapping[tuple, Any], epsilon: float = BatchNorm.epsilon) -> dict[tuple, Any]:
    """Flat variables ({("params" | "batch_stats", *path): array}, numpy or JAX arrays) with each BasicConv's
    `bn` folded into its `conv`: the conv gains a bias and the bn's parameters and statistics are gone."""
    out = {p: v for p, v in flat.items() if "bn" not in p}
    for path in flat:
        if path[0] == "params" and path[-2:] == ("bn", "scale"):
            mod = path[1:-2]
            var = flat[("batch_stats", *mod, "bn", "var")]
            sqrt = np.sqrt if isinstance(var, np.ndarray) else jnp.sqrt
            mul = flat[path] / sqrt(var + epsilon)
            out[("params", *mod, "conv", "kernel")] = flat[("params", *mod, "conv", "kernel")] * mul
            out[("params", *mod, "conv", "bias")] = (flat[("params", *mod, "bn", "bias")]
                                                     - flat[("batch_stats", *mod, "bn", "mean")] * mul)
    return out


def fold_batch_norm(variables: Mapping[str, Any], epsilon: float = BatchNorm.epsilon) -> dict[str, Any]:
    """Variables for a folded GoogLeNet (`folded`).

    Args:
      variables: a GoogLeNet's variables, {"params": ..., "batch_stats": ...} (or "params" alone for the
        variants without BatchNorm).
      epsilon: BatchNorm's epsilon (torchvision's BasicConv2d: 1e-3).

    Returns:
      {"params": ...} with each conv's kernel scaled and a bias added, no BatchNorm parameters or statistics.
      Traceable: `jax.jit(fold_batch_norm)` folds on the device.
    """
    flat = fold_batch_norm_flat(traverse_util.flatten_dict(unfreeze(dict(variables))), epsilon)
    return {"params": traverse_util.unflatten_dict({p[1:]: v for p, v in flat.items() if p[0] == "params"})}


def folded(model: GoogLeNet) -> GoogLeNet:
    """The same network computing inference on folded variables: each conv with its bias and ReLU in one kernel."""
    return model.clone(folded=True)


def apply(model: GoogLeNet, variables: Mapping[str, Any], x, *, chunk: int | None = None,
          after_stem_chunk: int | None = None):
    """The folded `model`'s logits of NHWC `x` (`model.apply(variables, x, train=False)`), the batch computed in
    chunks one after another (`jax.lax.map`), the last chunk padded with zeros: the stem (`GoogLeNet.stem`) in
    chunks of `chunk` images, the stages after it (`GoogLeNet.after_stem`) in chunks of `after_stem_chunk`
    (defaults `plan.eval_chunk`'s: on the CPU a few images at a time through the stem, whose maps are the
    largest, so each layer's output stays in cache; more, or the whole batch, after it). Jit it; differentiable
    in `x`."""
    n = x.shape[0]
    chunk = plan.eval_chunk(n, x.shape[1], x.shape[2]) if chunk is None else chunk
    stem = _in_chunks(lambda xc: model.apply(variables, xc, method="stem"), x, chunk)
    if after_stem_chunk is None:
        after_stem_chunk = plan.eval_chunk(n, stem.shape[1], stem.shape[2], part="after_stem")
    return _in_chunks(lambda sc: model.apply(variables, sc, method="after_stem"), stem, after_stem_chunk)


def _in_chunks(f, x, chunk: int):
    """f of the batch x in chunks of `chunk` rows one after another (`jax.lax.map`), the last one padded with
    zeros; f of x itself where one chunk holds it."""
    n = x.shape[0]
    if chunk >= n:
        return f(x)
    pad = -n % chunk
    xs = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((n + pad) // chunk, chunk, *x.shape[1:])
    ys = jax.lax.map(f, xs)
    return ys.reshape(n + pad, *ys.shape[2:])[:n]


def prepare(model: GoogLeNet, variables: Mapping[str, Any], image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """`variables` of a folded model with the "prepared" collection added: each convolution's weights in the form
    its kernel multiplies by for `image_shape` (H, W, C) inputs (Winograd's U = G g G^T, a small map's dense
    operator; `jax_googlenet.ops.plan`), computed once in one jitted call whose output is the weights alone (the
    forward pass it traces is dead code to XLA). Any batch size; another image size needs its own."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    made = _prepare_fn(model)(dict(variables), x)
    return {**{k: v for k, v in variables.items() if k != PREPARED}, **made}


@functools.lru_cache(maxsize=8)
def _prepare_fn(model: GoogLeNet):
    """The jitted preparation, once per model: the jobs prepare before every evaluation."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=[PREPARED])[1])


def fold(model: GoogLeNet, variables: Mapping[str, Any],
         image_shape: tuple[int, int, int] | None = None) -> tuple[GoogLeNet, dict[str, Any]]:
    """(`folded(model)`, `fold_batch_norm(variables)`), with `image_shape` (H, W, C) also `prepare`d for that
    input size: apply the pair with `train=False`."""
    model, variables = folded(model), fold_batch_norm(variables, BatchNorm.epsilon)
    return model, (variables if image_shape is None else prepare(model, variables, image_shape))
