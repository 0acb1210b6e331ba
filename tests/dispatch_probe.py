"""Whether JAX's CPU steps run on the calling thread, as `jax_googlenet.host_memory` sets them, asked publicly.

JAX has no public "has a backend started", so the tests ask the setting's effect instead: a step of a tenth of a
second or more has finished when its call returns only if it ran on the calling thread (`jax.Array.is_ready`).
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = """
import jax, jax.numpy as jnp

def work(x):
    for _ in range(6):  # 13 GFLOP: 0.1 s or more on any CPU, still running when an asynchronous call returns
        x = jnp.tanh(x @ x)
    return x

cpu = jax.devices("cpu")[0]  # the setting is the CPU client's, whatever the default backend
step, x = jax.jit(work), jax.device_put(jnp.full((1024, 1024), 1e-3, jnp.float32), cpu)
step(x).block_until_ready()
y = step(x)
print("step finished when its call returned:", y.is_ready())
y.block_until_ready()
"""

# A job's main(argv) in this process, its status printed, then STEP.
JOB_THEN_STEP = """
import importlib, sys
try:
    status = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
except SystemExit as exit:
    status = exit.code
print("exit status", status, flush=True)
""" + STEP


def run(code: str, *args: str, cwd=ROOT, **env: str) -> subprocess.CompletedProcess:
    """`python -c code *args` in a process of its own (the settings are process-wide), importing this checkout's
    packages from any `cwd`, with `env` added to the environment."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": path, **env})
