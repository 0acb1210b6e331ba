"""Training library: train state, optimizer, losses, and the train and eval steps (plain functions).

The steps are plain functions; jit them where they are used (`jit_train_step`, `jit_eval_step` donate the
state's buffers and keep the sharding given by `jax_googlenet.distributed`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jax_googlenet.model import RENAMED, GoogLeNetOutputs

AUX_WEIGHT = 0.3  # the paper's weight of each auxiliary loss
LOSS_MODES = ("paper", "writeup")


class TrainState(train_state.TrainState):
    """optax state plus BatchNorm running statistics (empty for variants without BatchNorm)."""

    batch_stats: Any = None


def make_optimizer(learning_rate: float, *, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0, schedule: str = "constant", total_steps: int = 0,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
    """SGD with momentum; `schedule` is "constant", "cosine" or "onecycle" (optax schedules).

    Weight decay is coupled L2 on every parameter, as `torch.optim.SGD(weight_decay=...)` does.
    """
    if schedule == "constant":
        lr = learning_rate
    elif schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else learning_rate, learning_rate,
                                                warmup_steps, max(total_steps, warmup_steps + 1))
    elif schedule == "onecycle":
        lr = optax.cosine_onecycle_schedule(max(total_steps, 1), learning_rate)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose constant, cosine or onecycle")
    sgd = optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)
    return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd


def create_train_state(rng: jax.Array, model: nn.Module, input_shape: tuple[int, ...],
                       tx: optax.GradientTransformation) -> TrainState:
    """Initialise the model on zeros of `input_shape` (NHWC, batch included) and the optimizer."""
    variables = jax.jit(model.init)(rng, jnp.zeros(input_shape, jnp.float32))
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}))


def classification_loss(outputs: GoogLeNetOutputs, labels: jax.Array, mode: str = "paper") -> jax.Array:
    """Mean cross-entropy of a training-mode forward.

    "paper": CE(logits) + 0.3 * (CE(aux1) + CE(aux2)), the rule of the paper (section 5) that the write-up's
    text states. "writeup": CE(logits + 0.3 * aux1 + 0.3 * aux2), what the write-up's code does: its model returns
    the weighted sum of the three heads' logits and one CE is taken of that, so the heads are trained jointly
    as one ensemble rather than each to classify alone. Missing aux heads count as zero in both.
    """
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()  # noqa: E731
    auxes = [a for a in (outputs.aux1, outputs.aux2) if a is not None]
    if mode == "paper":
        return ce(outputs.logits) + AUX_WEIGHT * sum(ce(a) for a in auxes)
    if mode == "writeup":
        return ce(outputs.logits + AUX_WEIGHT * sum(auxes))
    if mode in RENAMED:
        raise ValueError(f"the loss mode {mode!r} is now called {RENAMED[mode]!r}")
    raise ValueError(f"unknown loss mode {mode!r}; choose one of {', '.join(LOSS_MODES)}")


def identity(images: jax.Array) -> jax.Array:
    return images


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, loss_mode: str = "paper",
               preprocess: Callable[[jax.Array], jax.Array] = identity) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on `batch` ({"image", "label"}); dropout's key is `rng` folded with the step number, so
    a resumed run draws the same masks. Returns the new state and {"loss", "accuracy"} of the batch."""
    images = preprocess(batch["image"])
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        outputs, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                                          train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        return classification_loss(outputs, batch["label"], loss_mode), (outputs, updates)

    (loss, (outputs, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    accuracy = jnp.mean(jnp.argmax(outputs.logits, -1) == batch["label"])
    return state, {"loss": loss, "accuracy": accuracy}


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              preprocess: Callable[[jax.Array], jax.Array] = identity) -> dict[str, jax.Array]:
    """Sums over the batch: {"loss", "correct", "count"}; an optional boolean `mask` drops padding rows, so a
    padded last batch counts each real example once."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            preprocess(batch["image"]), train=False)
    mask = batch.get("mask", jnp.ones(logits.shape[:1], bool)).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss": jnp.sum(ce * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def jit_train_step(**kwargs) -> Callable:
    """`train_step` with its options bound, jitted, the incoming state's buffers donated."""
    return jax.jit(functools.partial(train_step, **kwargs), donate_argnums=0)


def jit_eval_step(**kwargs) -> Callable:
    return jax.jit(functools.partial(eval_step, **kwargs))
