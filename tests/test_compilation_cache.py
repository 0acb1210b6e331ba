"""The compile-time helpers: the garbage collector is paused exactly around the wrapped call, and the persistent
cache's directory is created for its user alone."""

import gc
import os
import stat

import jax
import jax.numpy as jnp
import pytest

from jax_googlenet import compilation_cache
from jax_googlenet.compilation_cache import gc_paused, without_gc


def test_without_gc_pauses_the_collector_during_the_call_and_restores_it_after_a_result_or_an_error():
    seen = []

    def step(x):
        seen.append(gc.isenabled())
        if x is None:
            raise ValueError("bad batch")
        return jax.jit(lambda v: v * 2)(x)

    wrapped = without_gc(step)
    assert wrapped.__name__ == "step"
    assert gc.isenabled()
    assert float(wrapped(jnp.float32(3))) == 6.0
    with pytest.raises(ValueError, match="bad batch"):
        wrapped(None)
    assert seen == [False, False] and gc.isenabled()


def test_gc_paused_leaves_a_collector_that_was_already_off_off():
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_enable_creates_the_cache_directory_and_its_missing_parents_for_its_user_alone(tmp_path):
    existing = tmp_path / "home"
    existing.mkdir(mode=0o755)
    previous, umask = jax.config.jax_compilation_cache_dir, os.umask(0o022)  # the usual umask: 0755 directories
    try:
        path = compilation_cache.enable(existing / "cache" / "xla")
        assert jax.config.jax_compilation_cache_dir == str(path) == str(existing / "cache" / "xla")
    finally:
        os.umask(umask)
        jax.config.update("jax_compilation_cache_dir", previous)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (path, path.parent, existing)] == [0o700, 0o700, 0o755]
