"""Timed windows: how many steps fill a window of at least --min-window-s (or --steps), the seconds per step
over a window that synchronises with the device only at its end, and the median, min and max over windows.
"""

from __future__ import annotations

import math
import statistics
import time


def steps_per_window(runner, args) -> int:
    if args.steps:
        return args.steps
    t = time.perf_counter()
    runner.step()
    runner.sync()
    return max(1, math.ceil(args.min_window_s / (time.perf_counter() - t)))


def time_window(runner, steps: int) -> float:
    """Seconds per step over `steps` steps, synchronised only at the end."""
    runner.sync()
    t = time.perf_counter()
    for _ in range(steps):
        runner.step()
    runner.sync()
    return (time.perf_counter() - t) / steps


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
