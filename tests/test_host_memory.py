"""`jax_googlenet.host_memory.configure`: unless told --system-malloc, glibc then serves a large block from its
heap rather than from fresh mmap pages and keeps it once freed, and a jitted CPU computation's buffers come from
that heap, call after call; either way it returns the line the jobs print. Each probe runs in its own process,
since the settings are process-wide."""

import subprocess
import sys
import textwrap

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
JAX_PROBE = textwrap.dedent("""
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
    for _ in range(4):  # the heap grows to the step's peak
        step(w, x).block_until_ready()
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(w, x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*faults)
""")


def probe(mode: str, code: str = PROBE) -> str:
    return subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stdout


def test_a_large_block_comes_from_the_heap_and_stays_there_once_freed():
    assert probe("system").splitlines() == ["host memory: system allocator (--system-malloc)",
                                            "mmapped 1 heap kept MB 0"]
    lines = probe("keep").splitlines()
    assert lines[0].startswith("host memory: freed blocks kept for reuse (glibc mallopt M_MMAP_MAX=0")
    mmapped, kept = lines[-1].split(" heap kept MB ")
    assert mmapped == "mmapped 0" and int(kept) >= 60  # the 64 MB block, less what the heap had free before


def test_a_jitted_steps_buffers_are_not_faulted_in_again_on_each_call():
    pages = (1 << 18) * 64 * 4 // 4096  # one 64 MB activation's pages
    lines = probe("system", JAX_PROBE).splitlines()
    assert lines[0] == "host memory: system allocator (--system-malloc)"
    assert all(int(f) >= pages for f in lines[-1].split())  # JAX's worker thread maps its buffers anew each call
    lines = probe("keep", JAX_PROBE).splitlines()
    assert "CPU steps run on the calling thread (jax_cpu_enable_async_dispatch=False)" in lines[0]
    # the main heap's blocks, reused; the heap may still grow once, when a call's blocks fit none of its free ones
    assert sum(int(f) < pages // 16 for f in lines[-1].split()) >= 4
