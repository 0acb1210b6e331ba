"""Starting a job: the process (multi-host, host memory, compilation cache), its device mesh, and weights to
warm-start from."""

from __future__ import annotations

from jax_googlenet import compilation_cache, distributed, host_memory

from experiments.cli import UsageError


def start_process(coordinator: str | None, num_processes: int | None, process_id: int | None, *,
                  compile_cache: bool, system_malloc: bool) -> None:
    """Join a multi-process run if there is one, keep freed host memory for reuse unless `system_malloc`
    (`host_memory`, its line printed) and turn the persistent compilation cache on."""
    distributed.initialize(coordinator, num_processes, process_id)
    print(host_memory.configure(system_malloc), flush=True)
    if compile_cache:
        compilation_cache.enable()


def make_mesh(devices: int | None, batch_size: int):
    """The data-parallel mesh over the first `devices` devices (default all), printed; the global batch must
    divide over it."""
    try:
        mesh = distributed.make_mesh(devices)
        distributed.check_batch_size(batch_size, mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(distributed.describe(mesh), flush=True)
    return mesh


def warm_start(path: str, model, state, *, fresh: tuple[tuple[str, ...], ...] = ()):
    """`state` with its parameters and BatchNorm statistics filled from pretrained GoogLeNet weights (a .pth or
    a checkpoint directory) wherever shapes allow, but for the `fresh` modules (`convert.load_pretrained`, which
    prints what it copied)."""
    try:
        from convert import load_pretrained
    except ImportError as e:
        raise UsageError(f"--init needs convert.load_pretrained and torch ({e})") from None
    variables = load_pretrained(path, model, {"params": state.params, "batch_stats": state.batch_stats},
                                fresh=fresh)
    print(f"initialised from {path}", flush=True)
    return state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}))
