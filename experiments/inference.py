"""What the jobs evaluate and save as model/: the training state's network with BatchNorm's statistics
recalibrated over training images (`--bn-recalibrate`, `jax_googlenet.recalibrate`), evaluated folded
(`jax_googlenet.fold`).

The training state keeps its running statistics (the checkpoints hold them, so `--resume` continues bit for
bit); the recalibrated ones go only into the evaluation and model/. The jobs' eval step takes folded variables,
{"params": ...} with each BatchNorm folded into its convolution, and its kernels' weight transforms prepared
(`jax_googlenet.fold.prepare`); the fold runs once per evaluation, on the host
in numpy (outside the step, and without compiling an XLA kernel per operation), so the step compiles once per
run.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterable

import jax

from experiments.rundir import started_without_stop_signals
from jax_googlenet import distributed, train
from jax_googlenet import fold as fold_ops
from jax_googlenet.fold import fold, folded
from jax_googlenet.layers import PREPARED
from jax_googlenet.model import GoogLeNet
from jax_googlenet.recalibrate import precise_batch_norm

# --bn-recalibrate's default: one epoch's training images, at most this many.
DEFAULT_IMAGES = 2000


def recalibrate_images(given: int | None, train_size: int, *, off: str | None = None) -> int:
    """Training images BatchNorm is recalibrated over: --bn-recalibrate when given, else 0 with a reason `off`
    (printed), else one epoch's images, at most DEFAULT_IMAGES."""
    if given is not None:
        return given
    if off is not None:
        print(f"BatchNorm: the running statistics ({off}; --bn-recalibrate N recalibrates)", flush=True)
        return 0
    return min(train_size, DEFAULT_IMAGES)


def jit_folded_eval_step(model: GoogLeNet, options: dict | None, *, mesh, **kwargs) -> Callable:
    """`train.eval_step` on the folded `model`: (folded variables, batch) -> sums, jitted once (per model,
    options, mesh and `kwargs`, `train.jit_eval_step`)."""
    return train.jit_eval_step(options, step=folded_eval_step, mesh=mesh, model=model, **kwargs)


def folded_eval_step(variables, batch, *, model: GoogLeNet, **kwargs):
    """`train.eval_step` of folded `variables` ({"params", "prepared"}) on the folded `model`."""

    def apply(v, x, *, train):  # eval_step applies {"params", "batch_stats"}: the prepared weights join them here
        del train  # eval_step's train=False
        return fold_ops.apply(folded(model), {"params": v["params"], PREPARED: variables[PREPARED]}, x)

    state = types.SimpleNamespace(apply_fn=apply, params=variables["params"], batch_stats={})
    return train.eval_step(state, batch, **kwargs)


class Inference:
    """The training state's variables as evaluated: recalibrated over `batches()` (up to `images` training
    images, none when 0) under `preprocess`, and folded for the eval step. The recalibration of a step is kept
    for model/."""

    def __init__(self, model: GoogLeNet, *, image_shape: tuple[int, int, int], images: int,
                 batches: Callable[[int], Iterable[dict]], preprocess: Callable, options: dict | None, mesh,
                 lead: bool = True):
        self.model, self.image_shape, self.images, self.batches = model, image_shape, images, batches
        self.preprocess, self.options, self.mesh, self.lead = preprocess, options, mesh, lead
        self._recalibrated: tuple[int, dict] | None = None

    def variables(self, state) -> dict[str, Any]:
        """{"params", "batch_stats"} of `state` on the host, the statistics recalibrated when asked."""
        batch_stats = state.batch_stats
        if self.images and self.model.variant.batch_norm:
            step = int(state.step)
            if self._recalibrated is None or self._recalibrated[0] != step:
                stats = precise_batch_norm(
                    self.model, {"params": state.params, "batch_stats": state.batch_stats},
                    (distributed.shard_batch(b, self.mesh)
                     for b in started_without_stop_signals(self.batches(self.images))),  # as the loop's data
                    max_images=self.images, preprocess=self.preprocess, mesh=self.mesh,
                    compiler_options=self.options)
                if self.lead:
                    print(stats.summary(), flush=True)
                self._recalibrated = step, stats.batch_stats
            batch_stats = self._recalibrated[1]
        return jax.device_get({"params": state.params, "batch_stats": batch_stats})

    def __call__(self, state) -> dict[str, Any]:
        """The folded variables the eval step takes (its kernels' weights prepared for the model's input shape),
        replicated over the mesh."""
        _, variables = fold(self.model, self.variables(state), self.image_shape)
        return distributed.replicate(variables, self.mesh)


def whole_batches(images: int, global_batch: int) -> int:
    """Global steps of whole batches that serve `images` (at least one)."""
    return max(1, images // global_batch)

