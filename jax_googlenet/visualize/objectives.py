"""Objectives: what a render maximises, on any `GoogLeNet.features()` output or on the logits ("logits").

An objective gives one value per image of the batch (the render maximises their sum), so a batch of objectives
(`channel("inception4a", range(16))`: image i maximises channel i) renders in one compiled step. Objectives add
(`a + b`) and scale (`2.0 * a`); each term's arrays are inputs of the compiled step, not constants, so renders
that differ only in channels, classes or directions reuse one compilation.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

LOGITS = "logits"
PER_IMAGE = ("index", "y", "x")  # arguments that give one value per image


@dataclasses.dataclass(frozen=True)
class Term:
    """`weight * kind(activations[layer], **args)`, a value per image."""

    kind: Callable[..., jax.Array]
    layer: str
    args: tuple[tuple[str, np.ndarray], ...]
    weight: float = 1.0

    @property
    def batch(self) -> int:
        return max([len(v) for k, v in self.args if k in PER_IMAGE and np.ndim(v) >= 1] or [1])


@dataclasses.dataclass(frozen=True)
class Objective:
    """A weighted sum of terms; `names` names each image (the file it is written to)."""

    terms: tuple[Term, ...]
    names: tuple[str, ...]

    @property
    def batch(self) -> int:
        """Images rendered: the longest per-image argument (index lists) of any term."""
        return max(t.batch for t in self.terms)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.layer for t in self.terms))

    def __add__(self, other: "Objective") -> "Objective":
        if not isinstance(other, Objective):
            return NotImplemented
        names = self.names if len(self.names) >= len(other.names) else other.names
        return Objective(self.terms + other.terms, names)

    def __mul__(self, factor: float) -> "Objective":
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return Objective(tuple(dataclasses.replace(t, weight=t.weight * factor) for t in self.terms), self.names)

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return -1.0 * self

    def __sub__(self, other: "Objective") -> "Objective":
        return self + (-1.0 * other)

    def structure(self) -> tuple:
        """The static part (kinds, layers, weights, argument names and shapes): equal structures share a
        compiled step."""
        return tuple((t.kind, t.layer, t.weight, tuple((k, np.shape(v)) for k, v in t.args)) for t in self.terms)

    def arrays(self) -> tuple:
        """The dynamic part: each term's argument arrays."""
        return tuple(tuple(jnp.asarray(v) for _, v in t.args) for t in self.terms)


def evaluate(structure: tuple, arrays: tuple, acts: dict[str, jax.Array], batch: int) -> jax.Array:
    """The objective's value per image ([batch]) from the activations of a batch of images."""
    total = jnp.zeros((batch,), jnp.float32)
    for (kind, layer, weight, arg_spec), values in zip(structure, arrays):
        kwargs = {name: v for (name, _), v in zip(arg_spec, values)}
        total = total + weight * jnp.broadcast_to(kind(acts[layer].astype(jnp.float32), **kwargs), (batch,))
    return total


def _indices(index: int | Iterable[int]) -> np.ndarray:
    return np.atleast_1d(np.asarray(list(index) if not np.isscalar(index) else index, np.int32))


def _term(kind, layer, **args) -> Term:
    return Term(kind, layer, tuple((k, np.asarray(v)) for k, v in args.items()))


# ----------------------------------------------------------------------------------------------- kinds
# Each takes the layer's activations of the whole batch (N x H x W x C, or N x K for the logits) and returns [N].


def _pick(act: jax.Array, index: jax.Array) -> jax.Array:
    """act[i, ..., index[i]] for each image i (index broadcast over the batch when it has one entry)."""
    index = jnp.broadcast_to(index, act.shape[:1])
    return jnp.take_along_axis(act, index.reshape((-1,) + (1,) * (act.ndim - 1)), axis=-1)[..., 0]


def _channel(act, index):
    return jnp.mean(_pick(act, index), axis=tuple(range(1, act.ndim - 1)))


def _neuron(act, index, y, x):
    n, h, w, _ = act.shape
    y, x = jnp.broadcast_to(y, (n,)), jnp.broadcast_to(x, (n,))
    at = act[jnp.arange(n), jnp.clip(y, 0, h - 1), jnp.clip(x, 0, w - 1)]  # N x C
    return _pick(at, index)


def _direction(act, vector):
    act = act.reshape(act.shape[0], -1, act.shape[-1])
    dots = act @ vector
    norms = jnp.linalg.norm(act, axis=-1) * jnp.linalg.norm(vector)
    return jnp.mean(dots / jnp.maximum(norms, 1e-8), axis=1)


def _logit(act, index):
    return _pick(act, index)


def _diversity(act):
    n = act.shape[0]
    flat = act.reshape(n, -1, act.shape[-1])
    grams = jnp.einsum("npc,npd->ncd", flat, flat)
    grams = grams / jnp.maximum(jnp.linalg.norm(grams.reshape(n, -1), axis=1), 1e-12)[:, None, None]
    sims = jnp.einsum("icd,jcd->ij", grams, grams)
    return -(jnp.sum(sims, axis=1) - jnp.diagonal(sims)) / n


# ----------------------------------------------------------------------------------------------- public


def channel(layer: str, index: int | Iterable[int]) -> Objective:
    """Mean activation of channel `index` of `layer` (a list: image i maximises channel index[i])."""
    idx = _indices(index)
    return Objective((_term(_channel, layer, index=idx),), tuple(f"{layer}_{i}" for i in idx))


def neuron(layer: str, index: int | Iterable[int], y: int | None = None, x: int | None = None,
           *, layer_side: int | None = None) -> Objective:
    """Activation of channel `index` at one position (y, x) of `layer`; the centre (lucent's choice: the
    lower right of the central 2x2 on even sides) when not given, which needs `layer_side`."""
    idx = _indices(index)
    if y is None or x is None:
        if layer_side is None:
            raise ValueError("neuron: give y and x, or layer_side for the centre")
        y = layer_side // 2 if y is None else y
        x = layer_side // 2 if x is None else x
    return Objective((_term(_neuron, layer, index=idx, y=np.int32(y), x=np.int32(x)),),
                     tuple(f"{layer}_{i}_y{y}_x{x}" for i in idx))


def direction(layer: str, vector, name: str | None = None) -> Objective:
    """Cosine similarity of each position's activation vector of `layer` with `vector`, averaged."""
    vector = np.asarray(vector, np.float32)
    return Objective((_term(_direction, layer, vector=vector),), (name or f"{layer}_direction",))


def logit(index: int | Iterable[int]) -> Objective:
    """The class logit `index` (a list: image i maximises class index[i])."""
    idx = _indices(index)
    return Objective((_term(_logit, LOGITS, index=idx),), tuple(f"logit_{i}" for i in idx))


def diversity(layer: str) -> Objective:
    """Lucid's diversity: minus the summed cosine similarity of each image's Gram matrix of `layer` with the
    other images' (shared among the images); add it to a batch objective to make the images differ."""
    return Objective((_term(_diversity, layer),), ())
