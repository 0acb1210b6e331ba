"""Compile time: JAX's persistent compilation cache, and Python's garbage collector kept out of tracing.

The cache is on by default for the experiments (`--no-compile-cache` turns it off): a second run of the MNIST
job or the benchmark loads the compiled train step from disk instead of compiling it again. The directory is
$JAX_GOOGLENET_CACHE_DIR, else ~/.cache/jax_googlenet/xla; the directories `enable` creates are its user's alone
(mode 0700): no other user reads the compiled programs and the paths they hold.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from pathlib import Path
from typing import Callable, Iterator

import jax

DEFAULT_DIR = Path.home() / ".cache" / "jax_googlenet" / "xla"


def cache_dir() -> Path:
    """The cache directory: $JAX_GOOGLENET_CACHE_DIR, else ~/.cache/jax_googlenet/xla."""
    return Path(os.environ.get("JAX_GOOGLENET_CACHE_DIR", DEFAULT_DIR))


def enable(path: str | os.PathLike | None = None) -> Path:
    """Turn the persistent cache on for every compilation of this process, whatever its size or time; the
    directories it creates for it have mode 0700. Returns the directory."""
    path = Path(path) if path is not None else cache_dir()
    for missing in reversed([p for p in (path, *path.parents) if not p.exists()]):
        missing.mkdir(mode=0o700, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def disable() -> None:
    """Turn the persistent cache off for the compilations that follow."""
    jax.config.update("jax_compilation_cache_dir", None)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block, back on after (if it was on).

    Tracing the train step allocates some 10^5 objects that all stay alive until it is lowered, and every
    generation-2 collection on the way walks them all to free nothing: on a 2-core CPU the 16/224 train step's
    warm start (persistent cache) takes 2.1 s with the collector paused and 2.5 s with it on, the trace 1.0 s
    against 1.4 s (benchmarks/NOTES.md, "Compile time"). Reference counting still frees everything outside a
    cycle.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def without_gc(fun: Callable) -> Callable:
    """`fun` called under `gc_paused()`: for a jitted step, whose first call traces, lowers and compiles."""

    @functools.wraps(fun)
    def call(*args, **kwargs):
        with gc_paused():
            return fun(*args, **kwargs)

    return call
