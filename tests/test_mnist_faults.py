"""`python -m experiments.mnist` in subprocesses under faults a single in-process run cannot show: a signal to one
process of a two-process run, and a checkpoint directory the job may not write."""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import job_runs
import jax
import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
# torchvision variant at 16 px, global batch 8, 48 real digits: 6 steps an epoch.
TINY = ["--variant", "torchvision", "--image-size", "16", "--batch-size", "8", "--lr", "0.02"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Real digits from the shipped sample as IDX files, and an environment whose compilation cache is this
    module's own. Its jobs compile with most optimisations off (`JAX_DISABLE_MOST_OPTIMIZATIONS`) and XLA:CPU's
    elemental emitters (`job_runs.ELEMENTAL_EMITTERS`): compiling is most of a tiny run's time, and no result here
    is compared with a run compiled otherwise."""
    root = tmp_path_factory.mktemp("mnist_faults")
    spec = job_runs.write_sample_idx(root / "idx")
    environ = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_GOOGLENET_CACHE_DIR": str(root / "xla"),
               "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    environ["XLA_FLAGS"] = job_runs.ELEMENTAL_EMITTERS
    return {"root": root, "data": spec, "environ": environ}


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_saved_step(env):
    """SIGINT to process 1 alone of a two-process run (jax.distributed on localhost), sent within the first epoch
    (`job_runs.mnist_signalling_itself`, so no evaluation is compiled first): the processes agree on the stop at
    the same step (an any over them), save that checkpoint together and both exit 130; neither waits for the
    other in a collective it never enters."""
    workdir = env["root"] / "two_processes"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", job_runs.mnist_signalling_itself("SIGINT", process_id=1), "--data", env["data"],
           "--workdir", str(workdir), *TINY, "--epochs", "20", "--coordinator", f"localhost:{port}",
           "--num-processes", "2", "--process-id"]
    procs = [subprocess.Popen(cmd + [str(i)], cwd=ROOT, env=env["environ"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errs = [err for _, err in outputs]
    assert [p.returncode for p in procs] == [128 + signal.SIGINT] * 2, [e[-3000:] for e in errs]
    assert all("Traceback" not in e for e in errs), errs
    stopped = [[line for line in e.splitlines() if line.startswith("stopped by signal 2 at step ")] for e in errs]
    assert all(len(lines) == 1 for lines in stopped), errs
    assert stopped[0] == stopped[1]  # the same step, saved by both
    step = int(stopped[0][0].split()[6].rstrip(":"))
    assert f"saved checkpoint {step} in {workdir}" in stopped[0][0]
    assert 3 <= step < 6  # within the first epoch, at or after process 1's third step
    # the latest complete checkpoint is that step (read by name: its arrays are sharded over two processes)
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == step
    assert not list(workdir.rglob("*orbax-checkpoint-tmp*"))  # the save completed


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def without_permission_override():
    """In the child before exec: drop the capabilities by which root ignores file permissions (from the
    bounding set, so the exec'd job has them neither permitted nor effective); the kernel then checks the
    permission bits for it as for any user. The tests run as root, whose Python (under /root, mode 0700) an
    unprivileged uid could not even start."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if os.getuid() == 0 and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.slow
def test_permission_denied_while_saving_is_one_line_exit_1_and_leaves_the_last_checkpoint(env):
    """The checkpoint directory made read-only (0555) after the first checkpoint: the resumed run trains its
    epoch, cannot save checkpoint 12 (a real EACCES: the job runs without root's permission override), says so
    in one line and exits 1; checkpoint 6 and metrics.jsonl are as they were."""
    workdir = env["root"] / "read_only"
    stopped_after_the_first_epoch = job_runs.mnist_signalling_itself("SIGTERM", at_batch=None)
    first = subprocess.run([sys.executable, "-c", stopped_after_the_first_epoch, "--data", env["data"],
                            "--workdir", str(workdir), *TINY, "--epochs", "3"], cwd=ROOT, env=env["environ"],
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert job_runs.latest_checkpoint(workdir)[0] == 6 and [r["epoch"] for r in records(workdir)] == [1]
    metrics_before = (workdir / "metrics.jsonl").read_bytes()
    _, state_before = job_runs.latest_checkpoint(workdir)
    checkpoints = workdir / "checkpoints"
    files_before = sorted(str(p.relative_to(checkpoints)) for p in checkpoints.rglob("*"))

    checkpoints.chmod(0o555)
    try:
        proc = subprocess.run([sys.executable, "-m", "experiments.mnist", "--resume", "--workdir", str(workdir)],
                              cwd=ROOT, env=env["environ"], capture_output=True, text=True, timeout=600,
                              preexec_fn=without_permission_override)
    finally:
        checkpoints.chmod(0o755)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [proc.stderr.rstrip().splitlines()[-1]], proc.stderr[-3000:]  # one line, the last
    assert errors[0].startswith(f"error: saving checkpoint 12 in {workdir} failed (Permission denied); the last "
                                f"complete checkpoint is 6"), errors
    assert "resumed from step 6" in proc.stdout
    assert (workdir / "metrics.jsonl").read_bytes() == metrics_before
    assert sorted(str(p.relative_to(checkpoints)) for p in checkpoints.rglob("*")) == files_before
    step, state_after = job_runs.latest_checkpoint(workdir)
    assert step == 6
    for a, b in zip(jax.tree.leaves(state_after), jax.tree.leaves(state_before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
