"""Training library: train state, optimizer, losses, and the train and eval steps (plain functions).

The steps are plain functions; jit them where they are used (`jit_train_step` and `jit_eval_step`, which the
jobs and the benchmark share: XLA's compile options, the train state donated, outputs replicated over a
`jax_googlenet.distributed` mesh). For transfer learning the optimizer
gives the classifier heads and the backbone their own learning rates, or freezes the backbone, and `probe_step`
trains the classifier alone on the backbone's inference-mode features (a linear probe).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.training import train_state

from jax_googlenet import distributed
from jax_googlenet.model import RENAMED, GoogLeNetOutputs
from jax_googlenet.ops import plan

AUX_WEIGHT = 0.3  # the paper's weight of each auxiliary loss
LOSS_MODES = ("paper", "writeup")
# The layers with num_classes outputs: the classifier heads that fine-tuning on new classes starts fresh.
HEADS = (("fc",), ("aux1", "fc2"), ("aux2", "fc2"))


class TrainState(train_state.TrainState):
    """optax state plus BatchNorm running statistics (empty for variants without BatchNorm)."""

    batch_stats: Any = None


@functools.lru_cache(maxsize=16)
def make_optimizer(learning_rate: float, *, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0, schedule: str = "constant", total_steps: int = 0,
                   warmup_steps: int = 0, backbone_lr_scale: float = 1.0,
                   freeze_backbone: bool = False) -> optax.GradientTransformation:
    """SGD with momentum; `schedule` is "constant", "cosine" or "onecycle" (optax schedules).

    Weight decay is coupled L2 on every trained parameter, as `torch.optim.SGD(weight_decay=...)` does. With
    `backbone_lr_scale` the backbone (everything but `HEADS`) runs at that fraction of the heads' learning rate;
    with `freeze_backbone` only the main classifier `fc` trains and every other parameter gets a zero update
    (`optax.multi_transform`, groups from `param_groups`).

    Equal arguments give the same object: a train state holds its optimizer as static data, so a state made
    again with the same settings (a second run in one process) keeps the jitted steps' traces and executables.
    """
    if freeze_backbone or backbone_lr_scale != 1.0:
        sgd = functools.partial(make_optimizer, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps)
        backbone = optax.set_to_zero() if freeze_backbone else sgd(learning_rate * backbone_lr_scale)
        return optax.multi_transform({"head": sgd(learning_rate), "backbone": backbone},
                                     functools.partial(param_groups, freeze_backbone=freeze_backbone))
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


def param_groups(params: Any, *, freeze_backbone: bool = False) -> Any:
    """"head" or "backbone" for each parameter (the tree of `params`): the heads are `HEADS`, or `fc` alone
    with `freeze_backbone` (a linear probe trains the main classifier only)."""
    heads = HEADS[:1] if freeze_backbone else HEADS
    return traverse_util.path_aware_map(
        lambda path, _: "head" if any(path[:len(h)] == h for h in heads) else "backbone", params)


# The init runs once: on the CPU it compiles without LLVM's optimisations and with XLA:CPU's elemental loop
# emitters (its program is the random initialisers, one threefry hash and truncated normal per parameter; the
# forward pass is dead code). For the 16-pixel MNIST model 3.9 s against 6.4 s at LLVM's level 0 alone and 12.7 s
# optimised, the parameters bit-identical to level 0 alone's and equal to the optimised init's within float
# rounding (7e-9); benchmarks/NOTES.md, "The default MNIST run". Options this jaxlib lacks are left out.
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0, **plan.ELEMENTAL_EMITTERS}}


def init_compiler_options(backend: str | None = None) -> dict[str, object] | None:
    """`INIT_COMPILER_OPTIONS` for `backend` (default: JAX's), less any option this jaxlib does not accept."""
    options = INIT_COMPILER_OPTIONS.get(backend or jax.default_backend())
    return None if options is None else {k: v for k, v in options.items() if plan.accepts({k: v})}


def create_train_state(rng: jax.Array, model: nn.Module, input_shape: tuple[int, ...],
                       tx: optax.GradientTransformation) -> TrainState:
    """Initialise the model on zeros of `input_shape` (NHWC, batch included) and the optimizer. Traceable (e.g.
    under `jax.eval_shape`): inside a trace the init joins the outer computation, without its compile options."""
    model = _canonical(model)
    x = jnp.zeros(input_shape, jnp.float32)
    traced = isinstance(rng, jax.core.Tracer) or isinstance(x, jax.core.Tracer)
    options = None if traced else init_compiler_options()
    variables = _jitted_init(model, _items(options))(rng, x)
    params = variables["params"]
    # The optimizer's state as one program: eagerly (TrainState.create), each parameter shape's momentum zeros
    # compiled on its own, 69 compiles and ~3 s of every cold start of the MNIST model (measured).
    return TrainState(step=0, apply_fn=model.apply, params=params, tx=tx, opt_state=jax.jit(tx.init)(params),
                      batch_stats=variables.get("batch_stats", {}))


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0,
                  weights: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over the batch (weighted by `weights` when given); `label_smoothing` mixes the one-hot
    target with the uniform distribution, as `torch.nn.CrossEntropyLoss(label_smoothing=...)` does."""
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        ce = optax.softmax_cross_entropy(logits, targets)
    else:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if weights is None:
        return ce.mean()
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def classification_loss(outputs: GoogLeNetOutputs, labels: jax.Array, mode: str = "paper", *,
                        label_smoothing: float = 0.0, weights: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of a training-mode forward (see `cross_entropy` for the options).

    "paper": CE(logits) + 0.3 * (CE(aux1) + CE(aux2)), the rule of the paper (section 5) that the write-up's
    text states. "writeup": CE(logits + 0.3 * aux1 + 0.3 * aux2), what the write-up's code does: its model returns
    the weighted sum of the three heads' logits and one CE is taken of that, so the heads are trained jointly
    as one ensemble rather than each to classify alone. Missing aux heads count as zero in both.
    """
    ce = functools.partial(cross_entropy, labels=labels, label_smoothing=label_smoothing, weights=weights)
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
               preprocess: Callable[[jax.Array], jax.Array] = identity,
               label_smoothing: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on `batch` ({"image", "label"}, optionally a boolean "mask" of the rows that count); dropout's
    key is `rng` folded with the step number, so a resumed run draws the same masks. Returns the new state and
    {"loss", "accuracy"} of the batch."""
    images = preprocess(batch["image"])
    dropout_rng = jax.random.fold_in(rng, state.step)
    weights = _weights(batch)

    def loss_fn(params):
        outputs, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                                          train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        loss = classification_loss(outputs, batch["label"], loss_mode, label_smoothing=label_smoothing,
                                   weights=weights)
        return loss, (outputs, updates)

    (loss, (outputs, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    return state, {"loss": loss, "accuracy": _accuracy(outputs.logits, batch["label"], weights)}


def probe_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array | None = None, *,
               preprocess: Callable[[jax.Array], jax.Array] = identity,
               label_smoothing: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step of a linear probe: the network runs in inference mode (running BatchNorm statistics, no dropout,
    no aux heads) and only the classifier `fc` is differentiated, so the backbone's backward pass is never
    computed; the other parameters get zero gradients (the optimizer must freeze them: `make_optimizer(...,
    freeze_backbone=True)`) and the statistics are left as they are. `rng` is unused (no dropout)."""
    images = preprocess(batch["image"])
    weights = _weights(batch)

    def loss_fn(fc):
        logits = state.apply_fn({"params": {**state.params, "fc": fc}, "batch_stats": state.batch_stats}, images,
                                train=False)
        return cross_entropy(logits, batch["label"], label_smoothing=label_smoothing, weights=weights), logits

    (loss, logits), fc_grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["fc"])
    grads = {**jax.tree.map(jnp.zeros_like, state.params), "fc": fc_grads}
    state = state.apply_gradients(grads=grads)
    return state, {"loss": loss, "accuracy": _accuracy(logits, batch["label"], weights)}


def _weights(batch: dict[str, jax.Array]) -> jax.Array | None:
    return batch["mask"].astype(jnp.float32) if "mask" in batch else None


def _accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None) -> jax.Array:
    correct = jnp.argmax(logits, -1) == labels
    if weights is None:
        return jnp.mean(correct)
    return jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              preprocess: Callable[[jax.Array], jax.Array] = identity,
              num_classes: int | None = None) -> dict[str, jax.Array]:
    """Sums over the batch: {"loss", "correct", "count"}; an optional boolean `mask` drops padding rows, so a
    padded last batch counts each real example once. With `num_classes`, also "correct_top5" and "confusion"
    ([true class, predicted class] counts)."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            preprocess(batch["image"]), train=False)
    mask = batch.get("mask", jnp.ones(logits.shape[:1], bool)).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    predicted = jnp.argmax(logits, -1)
    correct = (predicted == batch["label"]).astype(jnp.float32)
    sums = {"loss": jnp.sum(ce * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
    if num_classes is None:
        return sums
    _, top5 = jax.lax.top_k(logits, min(5, num_classes))
    in_top5 = jnp.any(top5 == batch["label"][:, None], axis=-1).astype(jnp.float32)
    confusion = jnp.zeros((num_classes, num_classes), jnp.float32).at[batch["label"], predicted].add(mask)
    return {**sums, "correct_top5": jnp.sum(in_top5 * mask), "confusion": confusion}


def jit_train_step(compiler_options: dict | None = None, *, step: Callable = train_step, mesh=None,
                   **kwargs) -> Callable:
    """`step` (default `train_step`) with `kwargs` bound, jitted with XLA's `compiler_options`
    (`ops.compiler_options` for the image size), the incoming state's buffers donated, the outputs replicated
    over `mesh` when given. The same arguments give the same jitted function (`_jit`)."""
    return _jit(step, kwargs, compiler_options, mesh, donate_argnums=0)


def jit_eval_step(compiler_options: dict | None = None, *, step: Callable = eval_step, mesh=None,
                  **kwargs) -> Callable:
    """`step` (default `eval_step`) with `kwargs` bound, jitted with XLA's `compiler_options`, the outputs
    replicated over `mesh` when given. The same arguments give the same jitted function (`_jit`)."""
    return _jit(step, kwargs, compiler_options, mesh)


def _items(options: dict | None) -> tuple | None:
    return None if options is None else tuple(sorted(options.items()))


def _jit(step: Callable, kwargs: dict, compiler_options: dict | None, mesh, donate_argnums=()) -> Callable:
    """One jitted function per (step, its bound keyword arguments, options, mesh), kept for the process: jit's
    traces and executables live in the function, so a second run of a job in one process (the tests run ~40)
    skips tracing, lowering and loading the executable again (~7 s of an in-process rerun's 11.6 s at 16 pixels,
    measured). The keyword arguments must be hashable: pass arrays (e.g. a dropout key) at the call."""
    unhashable = [name for name, value in kwargs.items() if not _hashable(value)]
    if unhashable:
        raise TypeError(f"{', '.join(unhashable)}: a jitted step's bound arguments must be hashable (they key its "
                        "cache); pass arrays such as a dropout key at the call")
    return _cached_jit(step, tuple(sorted(kwargs.items())), _items(compiler_options), mesh, donate_argnums)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=32)
def _cached_jit(step: Callable, kwargs: tuple, options: tuple | None, mesh, donate_argnums) -> Callable:
    jit_kwargs = {"donate_argnums": donate_argnums}
    if mesh is not None:
        jit_kwargs["out_shardings"] = distributed.replicated(mesh)
    return jax.jit(functools.partial(step, **dict(kwargs)),
                   compiler_options=None if options is None else dict(options), **jit_kwargs)


@functools.lru_cache(maxsize=8)
def _canonical(model: nn.Module) -> nn.Module:
    """The first model equal to `model` that this process made a train state for: the state holds `model.apply`
    as static data, and bound methods compare by their object's identity, so an equal model's state would
    otherwise miss the jitted steps' caches."""
    return model


@functools.lru_cache(maxsize=8)
def _jitted_init(model: nn.Module, options: tuple | None) -> Callable:
    """`model.init` jitted once per model and options (`create_train_state`)."""
    return jax.jit(model.init, compiler_options=None if options is None else dict(options))
