"""JAX's persistent compilation cache for the project's jitted functions.

On by default for the experiments (`--no-compile-cache` turns it off): a second run of the MNIST job or the
benchmark loads the compiled train step from disk instead of compiling it again. The directory is
$JAX_GOOGLENET_CACHE_DIR, else ~/.cache/jax_googlenet/xla.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_DIR = Path.home() / ".cache" / "jax_googlenet" / "xla"


def cache_dir() -> Path:
    return Path(os.environ.get("JAX_GOOGLENET_CACHE_DIR", DEFAULT_DIR))


def enable(path: str | os.PathLike | None = None) -> Path:
    """Turn the persistent cache on for every compilation of this process, whatever its size or time."""
    path = Path(path) if path is not None else cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def disable() -> None:
    jax.config.update("jax_compilation_cache_dir", None)
