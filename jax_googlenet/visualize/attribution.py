"""Attribution of a class logit to the input pixels: gradients, SmoothGrad (Smilkov et al. 2017) and integrated
gradients (Sundararajan et al. 2017), and a heat-map overlay.

Images are N x H x W x C in [0, 1], the model's input space before normalisation; attributions have their shape.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("gradients", "smoothgrad", "integrated")


def _logit_fn(model, variables, mean, std, target):
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def f(images):  # [N] logits of class target[i]
        logits = model.apply(variables, (images - mean) / std, train=False)
        return jnp.take_along_axis(logits, jnp.broadcast_to(target, (images.shape[0],))[:, None], axis=1)[:, 0]

    return f


@functools.partial(jax.jit, static_argnames=("model",))
def gradients(model, variables, images, target, mean=0.0, std=1.0) -> jax.Array:
    """d logit[target] / d image, per image (target: an int or one per image)."""
    f = _logit_fn(model, variables, mean, std, jnp.asarray(target, jnp.int32))
    return jax.grad(lambda x: jnp.sum(f(x)))(images)


@functools.partial(jax.jit, static_argnames=("model", "samples"))
def smoothgrad(model, variables, images, target, key, mean=0.0, std=1.0, *, samples: int = 32,
               noise: float = 0.15) -> jax.Array:
    """Gradients averaged over `samples` copies of the image with Gaussian noise of sd `noise` (a fraction of
    the [0, 1] range; the paper's 10-20%)."""
    f = _logit_fn(model, variables, mean, std, jnp.asarray(target, jnp.int32))
    grad = jax.grad(lambda x: jnp.sum(f(x)))

    def body(total, k):
        return total + grad(images + noise * jax.random.normal(k, images.shape)), None

    total, _ = jax.lax.scan(body, jnp.zeros_like(images), jax.random.split(key, samples))
    return total / samples


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def integrated_gradients(model, variables, images, target, baseline=None, mean=0.0, std=1.0, *,
                         steps: int = 256) -> jax.Array:
    """(image - baseline) times the gradient averaged along the straight path from `baseline` (default black)
    to the image, by the trapezoidal rule on `steps` intervals: the attributions sum to
    logit(image) - logit(baseline) up to the rule's error, which ReLU kinks along the path make first order in
    1 / steps (1.5% at 64 steps on a held-out digit of the test's MNIST model)."""
    baseline = jnp.zeros_like(images) if baseline is None else jnp.broadcast_to(baseline, images.shape)
    f = _logit_fn(model, variables, mean, std, jnp.asarray(target, jnp.int32))
    grad = jax.grad(lambda x: jnp.sum(f(x)))
    alphas = jnp.linspace(0.0, 1.0, steps + 1)
    weights = jnp.full((steps + 1,), 1.0 / steps).at[0].set(0.5 / steps).at[-1].set(0.5 / steps)

    def body(total, aw):
        a, w = aw
        return total + w * grad(baseline + a * (images - baseline)), None

    total, _ = jax.lax.scan(body, jnp.zeros_like(images), (alphas, weights))
    return (images - baseline) * total


def heatmap(attribution: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """H x W in [0, 1]: |attribution| summed over channels, divided by its `percentile` and clipped."""
    a = np.abs(np.asarray(attribution)).sum(axis=-1)
    top = np.percentile(a, percentile)
    return np.clip(a / top, 0.0, 1.0) if top > 0 else np.zeros_like(a)


def overlay(image: np.ndarray, attribution: np.ndarray, alpha: float = 0.6, cmap: str = "inferno") -> np.ndarray:
    """H x W x 3 uint8: the image in grey with the heat map of `attribution` over it."""
    from matplotlib import colormaps

    grey = np.asarray(image, np.float32).mean(axis=-1, keepdims=True)
    heat = heatmap(attribution)
    colours = colormaps[cmap](heat)[..., :3]
    a = alpha * heat[..., None]
    return np.round(255 * np.clip((1 - a) * grey + a * colours, 0, 1)).astype(np.uint8)


def save_png(path: str | Path, array: np.ndarray) -> None:
    """An H x W x C (1 or 3) image, float in [0, 1] or uint8, written as a PNG."""
    from PIL import Image

    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.round(255 * np.clip(a, 0, 1)).astype(np.uint8)
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path, format="PNG")
