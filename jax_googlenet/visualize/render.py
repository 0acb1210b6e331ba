"""`render`: optimise images to maximise an objective, one jit-compiled Adam step (optax) per iteration."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_googlenet.visualize import transforms as T
from jax_googlenet.visualize.objectives import LOGITS, Objective, evaluate
from jax_googlenet.visualize.param import ImageParam


class Render(NamedTuple):
    images: np.ndarray  # N x H x W x C in [0, 1]: the model's input space before normalisation
    trace: np.ndarray  # steps x N: each image's objective at each step (on that step's transformed image)
    final: np.ndarray  # N: each final image's objective, untransformed


def activations(model, variables, x: jax.Array, layers: tuple[str, ...]) -> dict[str, jax.Array]:
    """The `layers` of `model.features(x)` and, for "logits", the classifier's output, from one forward pass
    (the logits are `fc` of `pre_logits`, as in eval mode, where dropout is the identity)."""
    feats = model.apply(variables, x, train=False, method=type(model).features)
    acts = {k: feats[k] for k in layers if k != LOGITS}
    if LOGITS in layers:
        fc = variables["params"]["fc"]
        acts[LOGITS] = feats["pre_logits"].astype(jnp.float32) @ fc["kernel"] + fc["bias"]
    return acts


def check_layers(model, objective: Objective) -> None:
    """A ValueError naming the layers the model has, for an objective on one it has not."""
    known = set(layer_names(model)) | {LOGITS}
    unknown = [layer for layer in objective.layers if layer not in known]
    if unknown:
        raise ValueError(f"unknown layer {unknown[0]!r}; choose one of {', '.join(sorted(known))}")


@functools.lru_cache(maxsize=None)
def layer_names(model) -> tuple[str, ...]:
    """Names of `model.features()` outputs (traced once per model, at 224 pixels, which every variant takes)."""
    side = 224
    x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, method=type(model).features),
                            jax.eval_shape(model.init, jax.random.key(0), x), x)
    return tuple(shapes)


@functools.partial(jax.jit, static_argnames=("model", "param", "transforms", "out", "structure", "batch", "tx",
                                             "mean", "std"), donate_argnums=(1, 2))
def _step(variables, params, opt_state, key, arrays, *, model, param, transforms, out, structure, batch, tx,
          mean, std):
    """One Adam step on `params`; returns them, the optimiser state and each image's objective before it."""

    def loss(p):
        x = T.apply(transforms, key, param.image(p), out)
        x = (x - jnp.asarray(mean)) / jnp.asarray(std)
        values = evaluate(structure, arrays, activations(model, variables, x, _layers(structure)), batch)
        return -jnp.sum(values), values

    (_, values), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, values


@functools.partial(jax.jit, static_argnames=("model", "out", "structure", "batch", "mean", "std"))
def _evaluate(variables, images, arrays, *, model, out, structure, batch, mean, std):
    x = T.apply(T.NONE, None, images, out)
    x = (x - jnp.asarray(mean)) / jnp.asarray(std)
    return evaluate(structure, arrays, activations(model, variables, x, _layers(structure)), batch)


def _layers(structure: tuple) -> tuple[str, ...]:
    return tuple(dict.fromkeys(layer for _, layer, _, _ in structure))


@functools.lru_cache(maxsize=None)
def _adam(lr: float) -> optax.GradientTransformation:
    """One optimiser object per learning rate: it is a static argument of the compiled step."""
    return optax.adam(lr)


def _placement(variables):
    """Where the model's variables are, for the arrays a render optimises: their device (the default one for host
    arrays), or replicated over their mesh."""
    leaf = jax.tree.leaves(variables)[0]
    if not isinstance(leaf, jax.Array):
        return jax.devices()[0]
    if isinstance(leaf.sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
    return next(iter(leaf.devices()))


def _tuple(v: float | tuple[float, ...], channels: int) -> tuple[float, ...]:
    return tuple(float(a) for a in np.broadcast_to(np.asarray(v, np.float64), (channels,)))


def render(model, variables: dict[str, Any], objective: Objective, *, steps: int = 256, lr: float = 0.05,
           key: jax.Array, size: int = 128, input_size: int | None = None, kind: str = "fourier",
           decorrelate: bool = True, transforms: T.Transforms = T.STANDARD,
           mean: float | tuple[float, ...] = 0.0, std: float | tuple[float, ...] = 1.0,
           sd: float = 0.01, progress: Callable[[int], None] | None = None) -> Render:
    """Optimise `objective.batch` images so that `objective` is as large as it gets.

    Args:
      model: a `GoogLeNet` (anything with `features(x, train=False)`, `in_channels` and, for logits, `fc`).
      variables: its variables.
      objective: what to maximise (`jax_googlenet.visualize.objectives`); one image per entry of its batch.
      steps: Adam steps; lr: Adam's learning rate.
      key: the random key of the initial parameters and every step's transforms (same key, same images).
      size: side of the rendered images; input_size: side the model sees (the transformed images are resampled
        to it; default `size`).
      kind: "fourier" or "pixels" (`ImageParam`); decorrelate: Lucid's colour space (RGB models).
      transforms: the random transforms of each step (`transforms.STANDARD`, or `transforms.NONE`).
      mean, std: the model's input normalisation, (image - mean) / std on images in [0, 1].
      sd: standard deviation of the initial parameters.
      progress: called with the number of steps done after each step.

    Returns:
      `Render(images, trace, final)`: N x size x size x C images in [0, 1], the objective of each image at each
      step ([steps, N]) and of the final images untransformed ([N]).
    """
    check_layers(model, objective)
    c = model.in_channels
    batch = objective.batch
    param = ImageParam(size, c, batch, kind, decorrelate, sd)
    tx = _adam(float(lr))
    static = dict(model=model, out=input_size or size, structure=objective.structure(), batch=batch,
                  mean=_tuple(mean, c), std=_tuple(std, c))
    arrays = objective.arrays()
    init_key, step_key = jax.random.split(key)
    # The image's parameters and Adam's state placed where the model's variables are, as every step returns them:
    # jit compiles once per placement of its arguments, and uncommitted first arguments compiled the step twice
    # per render (12 s more for a 32-pixel GoogLeNet on 2 CPU cores, measured).
    params = param.init(init_key)
    params, opt_state = jax.device_put((params, tx.init(params)), _placement(variables))
    trace = []
    for i in range(steps):
        params, opt_state, values = _step(variables, params, opt_state, jax.random.fold_in(step_key, i), arrays,
                                          param=param, transforms=transforms, tx=tx, **static)
        trace.append(values)
        if progress is not None:
            progress(i + 1)
    images = param.image(params)
    final = _evaluate(variables, images, arrays, **static)
    trace = np.stack([np.asarray(v) for v in trace]) if trace else np.zeros((0, batch), np.float32)
    return Render(np.asarray(images), trace, np.asarray(final))
