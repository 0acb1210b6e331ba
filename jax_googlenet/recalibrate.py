"""Precise BatchNorm statistics: each BatchNorm layer's running mean and variance recomputed as the population
statistics of its input over a set of images, for evaluating and saving a model whose running averages lag its
weights.

The definition is PreciseBN's (fvcore's `fvcore.nn.update_bn_stats`, which detectron2's PreciseBN hook runs, and
pycls's `compute_precise_bn_stats`): the network runs in training mode, so every layer normalises with its
batch's statistics, and each layer's input is gathered over the batches; its mean and unbiased variance over all
the positions of all the batches are the new statistics, the batches pooled as fvcore's
`_PopulationVarianceEstimator` pools them (pycls averages the per-batch variances, an estimate of the same
variance for batches drawn at random). Per batch the step computes each layer's count, mean and sum of squared
deviations from that mean; the host combines the batches in float64 (Chan's parallel formula), so no
E[x^2] - E[x]^2 cancellation enters. Under `jax.jit` a batch sharded over a mesh's devices is reduced over all
of them.

    stats = precise_batch_norm(model, variables, batches, max_images=2000)
    evaluated = {**variables, "batch_stats": stats.batch_stats}   # params untouched
    print(stats.summary())                                      # "recalibrated BatchNorm over 1920 images"

The step runs the model's own kernels with each 1x1 convolution and its BatchNorm on its own
(`plan.separate_1x1`): in training the CPU's kernels compute an inception block's three 1x1 convolutions and
their BatchNorm as one product, past the BatchNorm layers this reads.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from jax_googlenet.layers import BatchNorm
from jax_googlenet.model import GoogLeNet
from jax_googlenet.ops import plan


class PreciseStats(NamedTuple):
    """What `precise_batch_norm` computed: the new `batch_stats` (the variables' tree) and the images used."""

    batch_stats: dict[str, Any]
    images: int

    def summary(self) -> str:
        return f"recalibrated BatchNorm over {self.images} images"


def _identity(x):
    return x


def batch_moments(model: GoogLeNet, variables: Mapping[str, Any], images: jax.Array,
                  preprocess: Callable = _identity) -> dict[tuple[str, ...], tuple[jax.Array, ...]]:
    """{BatchNorm path: (positions, mean, sum of squared deviations from it)} of each BatchNorm layer's input
    over the batch, per channel, in a training-mode forward pass (traceable; the running statistics are left as
    they are)."""
    moments = {}

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
            x = args[0].astype(jnp.promote_types(jnp.float32, args[0].dtype))
            axes = tuple(range(x.ndim - 1))
            mean, r = jnp.mean(x, axes), context.module.repeats  # each position counts r times (`repeats`)
            moments[context.module.path] = (jnp.int32(x.size // x.shape[-1] * r), mean,
                                            r * jnp.sum(jnp.square(x - mean), axes))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture), plan.separate_1x1():
        model.apply(dict(variables), preprocess(images), train=True, mutable=["batch_stats"],
                    rngs={"dropout": jax.random.key(0)})  # dropout acts after every BatchNorm: any key
    return moments


def precise_batch_norm(model: GoogLeNet, variables: Mapping[str, Any], batches: Iterable[Any], *,
                       max_images: int | None = None, preprocess: Callable = _identity, mesh=None,
                       compiler_options: dict | None = None) -> PreciseStats:
    """Population statistics of every BatchNorm layer over `batches` (PreciseBN; see the module docstring).

    Args:
      model: the GoogLeNet (a variant with BatchNorm; not folded).
      variables: its variables, {"params": ..., "batch_stats": ...}; the aux heads' layers are recomputed too
        when the model has them and the variables hold them.
      batches: an iterable of NHWC image batches (arrays, or dicts with an "image"), as the model takes them
        after `preprocess`; numpy arrays, or global jax Arrays sharded over `mesh`'s devices. A batch whose
        "mask" marks padding rows ends the pass (it is not used).
      max_images: use whole batches until the next would pass this many images (None: all); at least one.
      preprocess: applied to each batch inside the step (the jobs' on-device normalisation).
      mesh: the `jax.sharding.Mesh` the batches are sharded over; the statistics come back replicated on it.
      compiler_options: `jax.jit`'s XLA options (`jax_googlenet.ops.compiler_options` for the image size).
        The step is compiled once per model, preprocess, mesh and options, and kept for the next call.

    Returns:
      A `PreciseStats`: `batch_stats` with the tree of `variables["batch_stats"]`, each layer's "mean" and
      unbiased "var" replaced, and the number of images used; `variables` is not changed.
    """
    if model.folded or not model.variant.batch_norm:
        raise ValueError(f"precise_batch_norm needs a GoogLeNet with BatchNorm layers; this one is "
                         f"{'folded' if model.folded else f'the {model.variant.name} variant, without them'}")
    variables = unfreeze(dict(variables))
    model = model.clone(aux_logits=model.aux_logits and "aux1" in variables["params"])
    used = {k: variables[k] for k in ("params", "batch_stats")}
    step = _moments_step(model, preprocess, mesh, tuple(sorted((compiler_options or {}).items())))
    totals: dict[tuple[str, ...], tuple[int, np.ndarray, np.ndarray]] = {}
    images = 0
    for batch in batches:
        x = batch["image"] if isinstance(batch, Mapping) else batch
        if isinstance(batch, Mapping) and "mask" in batch and not bool(jnp.all(batch["mask"])):
            break  # a last batch padded with rows that are no images
        if max_images is not None and images and images + x.shape[0] > max_images:
            break
        for path, (count, mean, m2) in jax.device_get(step(used, x)).items():
            totals[path] = _combine(totals.get(path), int(count), np.asarray(mean, np.float64),
                                    np.asarray(m2, np.float64))
        images += x.shape[0]
        if max_images is not None and images >= max_images:
            break
    if not images:
        raise ValueError("precise_batch_norm got no batches")
    flat = traverse_util.flatten_dict(variables["batch_stats"])
    for path, (count, mean, m2) in totals.items():
        old = flat[(*path, "mean")]
        flat[(*path, "mean")] = jnp.asarray(mean, old.dtype)
        flat[(*path, "var")] = jnp.asarray(m2 / max(count - 1, 1), old.dtype)
    return PreciseStats(traverse_util.unflatten_dict(flat), images)


@functools.lru_cache(maxsize=8)
def _moments_step(model: GoogLeNet, preprocess: Callable, mesh, compiler_options: tuple) -> Callable:
    """`batch_moments` jitted, once per model, preprocess, mesh and XLA options: the jobs call
    `precise_batch_norm` before every evaluation."""
    jit_kwargs = {}
    if mesh is not None:
        from jax_googlenet import distributed

        jit_kwargs["out_shardings"] = distributed.replicated(mesh)
    return jax.jit(lambda v, x: batch_moments(model, v, x, preprocess), compiler_options=dict(compiler_options),
                   **jit_kwargs)


def _combine(total, count: int, mean: np.ndarray, m2: np.ndarray):
    """(count, mean, sum of squared deviations) of two sets of positions from each's (Chan et al.'s formula)."""
    if total is None:
        return count, mean, m2
    n, mu, s = total
    delta = mean - mu
    both = n + count
    return both, mu + delta * (count / both), s + m2 + delta * delta * (n * count / both)
