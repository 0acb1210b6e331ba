"""Data parallelism with jax.sharding: one mesh axis "data" over the devices of every process.

The batch is sharded along "data", parameters and optimizer state are replicated, and the same jitted
`train_step` runs on 1 or N devices: XLA inserts the cross-device reductions, so BatchNorm statistics and
the loss are over the global batch and N devices compute what one device computes for that batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Variables that, when set, mean the process was started by a multi-process launcher.
_LAUNCHER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run when given a coordinator or launched by SLURM/Open MPI; a no-op otherwise.

    Returns whether `jax.distributed.initialize` was called.
    """
    if coordinator is None and not any(os.environ.get(k) for k in _LAUNCHER_ENV):
        return False
    if os.environ.get("SLURM_NTASKS") == "1" and coordinator is None:
        return False
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh ("data",) over the first `num_devices` devices (all when None)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"--devices {num_devices}: this run has {len(devices)} device(s) "
                             f"({devices[0].platform}); choose 1 to {len(devices)}")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError("a multi-process run uses every device of every process; drop --devices")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), ("data",))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the devices (and over the processes)."""
    n = mesh.size
    if batch_size % n:
        lo = max(n, batch_size - batch_size % n)
        raise ValueError(f"batch size {batch_size} does not divide over {n} devices; use a multiple of {n} "
                         f"(for example {lo} or {lo + n})")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicate(tree, mesh: Mesh):
    """Place every leaf of `tree` (the same on every process) whole on every device of the mesh."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):  # device_put cannot reach other processes' devices: build the global array from local copies
        x = x if hasattr(x, "dtype") else np.asarray(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (its 1/process_count of the global batch), split on "data"."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def describe(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    return (f"mesh data={mesh.size} over {jax.process_count()} process(es), "
            f"{d.platform} ({getattr(d, 'device_kind', d.platform)})")
