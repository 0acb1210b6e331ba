"""Peak memory of one step. On CPU: how far the resident set rises during one step above its size just before
it (the kernel's VmHWM reset through /proc/self/clear_refs, glibc's free heap handed back first). On GPU: XLA's
memory_analysis for JAX, torch.cuda.max_memory_allocated for PyTorch. docs/benchmark.md says what each includes.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Callable

import jax


def _status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


def release_free_heap() -> bool:
    """Hand glibc's free heap pages back to the OS, so the next step's allocations show up in the RSS."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def rss_peak_of(run: Callable[[], None]) -> tuple[float, str]:
    """MB by which the resident set peaks above its size just before one more `run`, and how it was measured."""
    run()  # let allocators settle into their steady state first
    trimmed = release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    run()
    how = ("peak RSS growth during one step over the RSS before it (VmHWM reset through /proc/self/clear_refs"
           + (", free heap returned by malloc_trim first" if trimmed else ", no malloc_trim: not glibc")
           + "): the step's working memory; parameters, optimizer state and the batch already resident are not "
             "included")
    return (_status_kb("VmHWM") - before) / 1024, how


def device_memory_mb(runner, torch) -> tuple[float, str]:
    """Peak memory of one step and how it was measured (see docs/benchmark.md)."""
    if jax.devices()[0].platform != "cpu":
        if runner.framework == "jax":
            return runner.xla_memory_mb, "XLA memory_analysis: arguments + outputs + temporaries - donated"
        torch.cuda.reset_peak_memory_stats()
        runner.step()
        runner.sync()
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated (state included)"

    def run():
        runner.step()
        runner.sync()
    return rss_peak_of(run)
