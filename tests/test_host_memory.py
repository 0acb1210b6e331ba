"""`jax_googlenet.host_memory.configure`: unless told --system-malloc, glibc then serves a large block from its
heap rather than from fresh mmap pages and keeps it once freed, and JAX's CPU steps run on the calling thread, so
their buffers come from that heap, call after call; either way it returns the line the jobs print. JAX reads the
dispatch setting when its backend starts, so each job must make it its first JAX call: tested from the setting's
effect after each job's start. Each probe runs in its own process, since the settings are process-wide."""

import ctypes
import textwrap

import jax
import pytest

from dispatch_probe import JOB_THEN_STEP, STEP, run
from jax_googlenet import host_memory


def has_glibc_malloc_info() -> bool:
    """glibc's mallopt and mallinfo2 (glibc 2.33 and later) are in this process."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt and libc.mallinfo2)
    except (OSError, AttributeError):
        return False


needs_glibc = pytest.mark.skipif(not has_glibc_malloc_info(), reason="glibc's mallopt and mallinfo2 are absent")

PROBE = textwrap.dedent("""
    import ctypes, sys
    from jax_googlenet import host_memory

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    print(host_memory.configure(system_malloc=sys.argv[1] == "system"))
    before = libc.mallinfo2()
    block = libc.malloc(64 << 20)
    during = libc.mallinfo2()
    libc.free(ctypes.c_void_p(block))
    after = libc.mallinfo2()
    print("mmapped", during.hblks - before.hblks, "heap kept MB", (after.arena - before.arena) >> 20)
""")


# The gradient of three dot + ReLU layers on a 64 MB batch (about 300 MB of temporaries), called four times, then
# five times more: the page faults of each of the five calls.
FAULTS_PROBE = textwrap.dedent("""
    import resource, sys
    from jax_googlenet import host_memory

    print(host_memory.configure(system_malloc=sys.argv[1] == "system"))
    import jax
    import jax.numpy as jnp

    def loss(w, x):
        for _ in range(3):
            x = jax.nn.relu(x @ w)
        return jnp.sum(x)

    x, w = jnp.ones((1 << 18, 64), jnp.float32), jnp.full((64, 64), 0.01, jnp.float32)
    step = jax.jit(jax.grad(loss))
    for _ in range(8):  # the heap grows to the step's peak (4 calls left it growing again in 3 of 8 probes)
        step(w, x).block_until_ready()
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(w, x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*faults)
""")

CONFIGURE = "import sys\nfrom jax_googlenet import host_memory\nhost_memory.configure(sys.argv[1] == 'system')\n"
STARTED = "import jax\njax.devices()\n"  # starts JAX's backends


def probe(mode: str, code: str = PROBE) -> str:
    proc = run(code, mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@needs_glibc
@pytest.mark.slow
def test_a_large_block_comes_from_the_heap_and_stays_there_once_freed():
    assert probe("system").splitlines() == ["host memory: system allocator (--system-malloc)",
                                            "mmapped 1 heap kept MB 0"]
    lines = probe("keep").splitlines()
    assert lines[0].startswith("host memory: freed blocks kept for reuse (glibc mallopt M_MMAP_MAX=0")
    mmapped, kept = lines[-1].split(" heap kept MB ")
    assert mmapped == "mmapped 0" and int(kept) >= 60  # the 64 MB block, less what the heap had free before


@needs_glibc
@pytest.mark.slow
def test_a_jitted_steps_buffers_are_not_faulted_in_again_on_each_call():
    pages = (1 << 18) * 64 * 4 // 4096  # one 64 MB activation's pages
    lines = probe("system", FAULTS_PROBE).splitlines()
    assert lines[0] == "host memory: system allocator (--system-malloc)"
    assert all(int(f) >= pages for f in lines[-1].split())  # JAX's worker thread maps its buffers anew each call
    lines = probe("keep", FAULTS_PROBE).splitlines()
    assert "CPU steps run on the calling thread (jax_cpu_enable_async_dispatch=False)" in lines[0]
    # the main heap's blocks, reused; the heap may still grow once, when a call's blocks fit none of its free ones
    assert sum(int(f) < pages // 16 for f in lines[-1].split()) >= 4


@needs_glibc
@pytest.mark.slow
def test_steps_run_on_the_calling_thread_when_the_setting_comes_before_the_backend_starts():
    finished = lambda mode, code: probe(mode, code).splitlines()[-1].rsplit(" ", 1)[1]  # noqa: E731
    assert finished("system", CONFIGURE + STEP) == "False"
    assert finished("keep", CONFIGURE + STEP) == "True"
    # once a backend has started, the setting is too late: why the jobs make it their first JAX call
    assert finished("keep", STARTED + CONFIGURE + STEP) == "False"


def folder_of_two_classes(root):
    """root/train and root/val, two classes of one 8x8 PNG each."""
    from PIL import Image
    for split in ("train", "val"):
        for label, grey in (("a", 0), ("b", 255)):
            (root / split / label).mkdir(parents=True)
            Image.new("L", (8, 8), grey).save(root / split / label / "0.png")
    return root


@needs_glibc
@pytest.mark.slow
@pytest.mark.parametrize("job", ["experiments.mnist", "experiments.finetune"])
def test_each_job_sets_the_dispatch_before_anything_starts_jax(tmp_path, job):
    # --devices 99 is refused only once the job has started JAX and counted its devices: the job's whole start
    # runs, then the probe's step shows whether the setting came first.
    data = ("sample" if job == "experiments.mnist" else
            f"folder:{folder_of_two_classes(tmp_path / 'images')}")
    proc = run(JOB_THEN_STEP, job, "--data", data, "--batch-size", "2", "--devices", "99", "--no-compile-cache",
               "--workdir", str(tmp_path / "run"), cwd=tmp_path, JAX_GOOGLENET_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--devices 99" in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("host memory: freed blocks kept for reuse") for line in lines), proc.stdout
    assert lines[-2:] == ["exit status 2", "step finished when its call returned: True"], proc.stdout


def test_without_glibc_the_line_says_so_and_the_dispatch_is_left_alone(monkeypatch):
    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    updates = []
    monkeypatch.setattr(host_memory.ctypes, "CDLL", no_libc)
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    monkeypatch.setattr(jax.config, "update", lambda *setting: updates.append(setting))
    assert host_memory.configure(system_malloc=False) == (
        "host memory: system allocator (no glibc mallopt in this process)")
    assert host_memory.configure(system_malloc=True) == "host memory: system allocator (--system-malloc)"
    assert updates == []
