"""Runs one train step of a small GoogLeNet on a device mesh and saves the result; started by
test_distributed.py in subprocesses, so the simulated-device flags do not touch the rest of the suite.

    python -m tests.distributed_worker OUT.npz --devices N [M ...] [--coordinator HOST:PORT --num-processes P --process-id I]
"""

import argparse
import functools
import re

import jax
import numpy as np
from flax import traverse_util

from jax_googlenet import distributed, googlenet
from jax_googlenet import train as T

GLOBAL_BATCH, SIDE = 8, 24


def global_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(GLOBAL_BATCH, SIDE, SIDE, 1)).astype(np.float32),
            "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}


def host_copy(state: T.TrainState) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats}, sep="/")
    return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


@functools.cache
def initial_state() -> T.TrainState:
    """The train state before the step, on the host: initialised once per process, so a process stepping on
    two meshes compiles the init once (train.create_train_state jits a new init each call)."""
    model = googlenet(num_classes=10, in_channels=1)
    return jax.device_get(T.create_train_state(jax.random.key(0), model, (1, SIDE, SIDE, 1), T.make_optimizer(0.1)))


def one_step(num_devices: int | None) -> dict[str, np.ndarray]:
    """Flattened params and batch_stats before ("init/...") and after one SGD step on the mesh, the loss, and
    how many all-gathers the compiled step makes."""
    mesh = distributed.make_mesh(num_devices)
    distributed.check_batch_size(GLOBAL_BATCH, mesh)
    state = distributed.replicate(initial_state(), mesh)
    before = host_copy(state)  # the step donates the state's buffers
    rows = GLOBAL_BATCH // jax.process_count()
    local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in global_batch().items()}
    batch = distributed.shard_batch(local, mesh)
    rng = distributed.replicate(jax.random.key(1), mesh)
    step = T.jit_train_step().lower(state, batch, rng).compile()
    state, metrics = step(state, batch, rng)
    out = host_copy(state)
    out["all_gathers"] = np.asarray(len(re.findall(r"= \S+ all-gather(-start)?\(", step.as_text())))
    out.update({"init/" + k: v for k, v in before.items()})
    out["loss"] = np.asarray(metrics["loss"])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--devices", type=int, nargs="+", default=[None], help="one step per mesh size")
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    a = p.parse_args()
    distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    results = {f"{n}/{k}": v for n in a.devices for k, v in one_step(n).items()}
    if jax.process_index() == 0:
        np.savez(a.out, **results)


if __name__ == "__main__":
    main()
