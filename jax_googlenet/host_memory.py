"""Host memory on the CPU: the buffers one step frees stay in the process for the next step.

glibc's malloc serves large blocks (from 32 MB, and smaller ones as its threshold adapts) with fresh mmap pages
and unmaps them on free, so each train step would fault its activations in again page by page, the kernel zeroing
every page. `keep_freed_memory` turns that off through mallopt: no mmap for blocks (M_MMAP_MAX = 0) and no
trimming of the heap's free top (M_TRIM_THRESHOLD = -1), so the process keeps its peak heap for the next step.
On the project's 2-core CPU a jitted x * 2 on a 51 MB array takes 4.3-5.0 ms with these settings and 21-22 ms
without
(benchmarks/NOTES.md, "The step beyond the convolutions").

These settings govern the main heap only. glibc serves every other thread from per-thread arenas, heaps of at most
64 MB that are unmapped whenever one empties and that map a larger block afresh each time. JAX's CPU client runs
each step on a worker thread unless asynchronous dispatch is off, so `keep_freed_memory` also turns it off, and the
steps run, and allocate, on the calling thread: the 16/224 train step faults in ~300 pages per step instead of
184,600 (its 730 MB of temporaries) and takes 16-32% less time per train step at 16/224, 64/96 and 64/32
(benchmarks/NOTES.md, "Page faults on JAX's worker threads").

JAX reads the dispatch setting when it starts its CPU backend, and offers no public way to ask whether that has
happened, so `configure` must be a process's first JAX call (after `jax.distributed.initialize`, which starts no
backend): the jobs and the benchmark call it at start and print what it did, and tests/test_host_memory.py checks
for each of them that its steps then run on the calling thread. `--system-malloc` leaves malloc and the dispatch
as they are.
"""

from __future__ import annotations

import ctypes
import sys

import jax

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = -1  # glibc reads the threshold as unsigned: -1 is the largest, and turns trimming off


def configure(system_malloc: bool) -> str:
    """The jobs' and the benchmark's first JAX call: keep freed blocks unless `system_malloc` (their
    `--system-malloc`); returns the line they print."""
    return "host memory: system allocator (--system-malloc)" if system_malloc else keep_freed_memory()


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep the blocks it frees and JAX's CPU steps to run on the calling thread; returns
    the line to print: what was set, or why not. Call it before anything starts a JAX backend."""
    if not sys.platform.startswith("linux"):
        return f"host memory: system allocator (mallopt is glibc's; this is {sys.platform})"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "host memory: system allocator (no glibc mallopt in this process)"
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        return "host memory: system allocator (glibc refused mallopt)"
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return ("host memory: freed blocks kept for reuse (glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1: never trim; "
            "CPU steps run on the calling thread (jax_cpu_enable_async_dispatch=False); --system-malloc leaves both "
            "as they are)")
