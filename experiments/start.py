"""Starting a job: the process (multi-host, host memory, compilation cache), its device mesh, the config's
optimizer, the line naming the kernels, and weights to warm-start from."""

from __future__ import annotations

from pathlib import Path

import jax

from jax_googlenet import compilation_cache, distributed, host_memory, train
from jax_googlenet.ops import resolve_impl, xla_kernels

from experiments.cli import UsageError


def start_process(args) -> None:
    """Join a multi-process run if the run flags (`cli.add_run_flags`) ask for one and keep freed host memory
    for reuse unless --system-malloc (`host_memory`, its line printed)."""
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    print(host_memory.configure(args.system_malloc), flush=True)


def enable_compile_cache(args) -> None:
    """Turn the persistent compilation cache on unless --no-compile-cache: once the arguments, the run
    directory and the data are checked, before the first compile, so that refused arguments create nothing."""
    if not args.no_compile_cache:
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


def make_optimizer(cfg: dict, steps_per_epoch: int):
    """The config's SGD (`train.make_optimizer`): its schedule over the whole run, the warmup given in epochs,
    and the backbone's learning rate or freezing where the config has them."""
    return train.make_optimizer(cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                                weight_decay=cfg["weight_decay"], schedule=cfg["schedule"],
                                total_steps=steps_per_epoch * cfg["epochs"],
                                warmup_steps=round(cfg["warmup_epochs"] * steps_per_epoch),
                                backbone_lr_scale=cfg.get("backbone_lr_scale", 1.0),
                                freeze_backbone=cfg.get("freeze_backbone", False))


def kernels(model, cfg: dict) -> str:
    """What computes the model's convolutions and pools for the config's image size and dtype, for the
    "model:" line."""
    return (f"convolutions and pools: {resolve_impl(model.impl)} (chosen for the {jax.default_backend()} "
            f"backend), {xla_kernels(cfg['image_size'], cfg['dtype'])}")


def check_weights_file(flag: str, path: str | None) -> None:
    """A weights file given to `flag` is a PyTorch state dict by its first bytes (torch.save's zip archive or
    a pickle), checked before any data is read; a directory is read later (a checkpoint directory)."""
    if path is None or not Path(path).is_file():
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UsageError(f"{flag} {path}: not a PyTorch state dict (.pth: torch.save's zip archive or a pickle)")


def warm_start(path: str, model, state, *, fresh: tuple[tuple[str, ...], ...] = ()):
    """`state` with its parameters and BatchNorm statistics filled from pretrained GoogLeNet weights (a .pth or
    a checkpoint directory) wherever shapes allow, but for the `fresh` modules (`convert.load_pretrained`, which
    prints what it copied)."""
    try:
        from convert import load_pretrained
    except ImportError as e:
        raise UsageError(f"--init needs convert.load_pretrained and torch ({e})") from None
    try:
        variables = load_pretrained(path, model, {"params": state.params, "batch_stats": state.batch_stats},
                                    fresh=fresh)
    except (ValueError, OSError) as e:  # not a state dict, another architecture, nothing to transfer
        raise UsageError(f"--init {path}: {str(e).splitlines()[0]}") from None
    print(f"initialised from {path}", flush=True)
    return state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}))
