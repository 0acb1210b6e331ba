"""Data parallelism: N devices compute what one device computes for the same global batch.

Simulated CPU devices (`--xla_force_host_platform_device_count`) and `jax.distributed` need flags set before
JAX starts, so each case runs tests/distributed_worker.py in a subprocess and compares the saved results.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import job_runs
import numpy as np
import pytest

from jax_googlenet import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"


# The workers compile with `job_runs.UNOPTIMISED`: compiling the train step is most of each worker's time. Every
# run compared is compiled alike, and the meshes' partitioning and collectives, which the tests are about, are
# decided before the backend.


def run_worker(out: Path, *args: str, devices: int = 1) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {job_runs.UNOPTIMISED}")
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output


def updates(results, prefix: str) -> dict[str, np.ndarray]:
    """What one step changed: params and batch statistics after minus before."""
    names = [k[len(prefix):] for k in results.files if k.startswith(prefix)]
    return {n: results[prefix + n] - results[prefix + "init/" + n]
            for n in names if not n.startswith("init/") and n not in ("loss", "all_gathers")}


def assert_same_step(a, prefix_a: str, b, prefix_b: str) -> None:
    """The two runs' updates agree to 1e-3 relative (Frobenius) per tensor and their losses to 1e-6.

    The meshes reduce the gradient and the BatchNorm statistics over the batch in a different order; float32
    rounding of those sums (~1e-7) grows through 22 layers of backpropagation and BatchNorm's 1/std: measured
    here (the workers' `job_runs.UNOPTIMISED` compile), up to 1.1e-4 on the smallest updates (last-stage
    BatchNorm scales), 3e-5 on the median tensor. 1e-3 leaves a margin and still catches per-device statistics or a
    gradient averaged over the wrong count (order 1).
    """
    ua, ub = updates(a, prefix_a), updates(b, prefix_b)
    assert ua.keys() == ub.keys() and len(ua) > 100
    worst = max((np.linalg.norm(ua[k] - ub[k]) / max(np.linalg.norm(ub[k]), 1e-30), k) for k in ua)
    assert worst[0] < 1e-3, worst
    np.testing.assert_allclose(a[prefix_a + "loss"], b[prefix_b + "loss"], rtol=1e-6)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One process stepping on a 1- and a 2-device mesh, and two `jax.distributed` processes on localhost with
    one CPU device and half of the batch each; all three started at once (each mostly compiles)."""
    out = tmp_path_factory.mktemp("distributed")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    common = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
    procs = [run_worker(out / "mesh.npz", "--devices", "1", "2", devices=2)]
    procs += [run_worker(out / "procs.npz", *common, str(i)) for i in range(2)]
    wait(*procs)
    return np.load(out / "mesh.npz"), np.load(out / "procs.npz")


@pytest.mark.slow
def test_two_devices_compute_what_one_device_computes(results):
    mesh, _ = results
    assert_same_step(mesh, "2/", mesh, "1/")


@pytest.mark.slow
def test_two_processes_compute_what_one_process_computes(results):
    mesh, procs = results
    assert_same_step(procs, "None/", mesh, "1/")


@pytest.mark.slow
def test_a_data_parallel_step_gathers_nothing_onto_one_device(results):
    """Across devices only sums travel (all-reduce of gradients and batch statistics): no activation or batch
    is all-gathered, which a scan over the sharded batch axis (conv1's CPU weight gradient) would do."""
    mesh, procs = results
    assert int(mesh["2/all_gathers"]) == 0 and int(procs["None/all_gathers"]) == 0


def test_batch_that_does_not_divide_over_the_devices_is_refused():
    mesh = SimpleNamespace(size=4)
    distributed.check_batch_size(64, mesh)
    with pytest.raises(ValueError, match="batch size 66 does not divide over 4 devices; use a multiple of 4 "
                                         r"\(for example 64 or 68\)"):
        distributed.check_batch_size(66, mesh)
