"""Host memory on the CPU: the buffers one step frees stay in the process for the next step.

glibc's malloc serves large blocks (from 32 MB, and smaller ones as its threshold adapts) with fresh mmap pages
and unmaps them on free, so each train step faults its activations in again page by page, the kernel zeroing
every page. `keep_freed_memory` turns that off through mallopt: no mmap for blocks (M_MMAP_MAX = 0) and no
trimming of the heap's free top (M_TRIM_THRESHOLD = -1), so the process keeps its peak heap for the next step.
Measured on the project's 2-core CPU: a jitted x * 2 on a 51 MB array 22 -> 4.3 ms; in the benchmark at 16/224,
JAX's train step and eval +6% and +7%, PyTorch's +10% and +6% (benchmarks/NOTES.md, "The step beyond the
convolutions", H1).

Those settings hold for the main heap only. JAX's CPU client runs each step asynchronously on its own worker
thread, and glibc serves other threads from per-thread arenas: heaps of at most 64 MB, unmapped whenever one
empties whatever the trim threshold, and blocks too large for one (the train step's temporaries are one block)
mapped and unmapped each time. So the 16/224 train step still faulted in 184,600 pages per step (its 730 MB of
temporaries). `keep_freed_memory` therefore also turns JAX's asynchronous dispatch off on the CPU, so the steps
run, and allocate, on the calling thread: ~300 faults per step, and 16-32% less time per train step at 16/224, 64/96
and 64/32 (benchmarks/NOTES.md, H29).
One arena for all threads (M_ARENA_MAX = 1) stopped the faults as well but made XLA's parallel compile 50%
slower. The dispatch setting must come before JAX starts its CPU backend: the experiments and the benchmark call
this at start and print what it did; `--system-malloc` leaves malloc and the dispatch alone.
"""

from __future__ import annotations

import ctypes
import sys

import jax
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = -1  # glibc reads the threshold as unsigned: -1 is the largest, and turns trimming off


def configure(system_malloc: bool) -> str:
    """The jobs' and the benchmark's start: keep freed blocks unless `system_malloc` (their `--system-malloc`);
    returns the line they print."""
    return "host memory: system allocator (--system-malloc)" if system_malloc else keep_freed_memory()


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep the blocks it frees; returns the line to print: what was set, or why not."""
    if not sys.platform.startswith("linux"):
        return f"host memory: system allocator (mallopt is glibc's; this is {sys.platform})"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "host memory: system allocator (no glibc mallopt in this process)"
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        return "host memory: system allocator (glibc refused mallopt)"
    return ("host memory: freed blocks kept for reuse (glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1: never trim; "
            f"{_dispatch_on_calling_thread()}; --system-malloc leaves both as they are)")


def _dispatch_on_calling_thread() -> str:
    """Turn JAX's asynchronous CPU dispatch off, so that steps allocate from the main heap; say what was done."""
    if xla_bridge.backends_are_initialized():
        return "JAX's backend had started: CPU steps stay asynchronous, on worker threads"
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return "CPU steps run on the calling thread (jax_cpu_enable_async_dispatch=False)"
