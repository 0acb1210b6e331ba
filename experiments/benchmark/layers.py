"""`python -m experiments.benchmark.layers`: every convolution and max pool of GoogLeNet alone, ours against
PyTorch's, forward and forward + backward, so a gap in the whole step can be traced to its layers.

    python -m experiments.benchmark.layers --batch-size 16 --image-size 224 --impls slices,winograd --markdown t.md

The layers and their input shapes are read off the model itself (the kernel plan's record of one abstract forward,
`jax_googlenet.ops.plan.recording`). Each layer runs jitted on random data: forward, then forward and the gradients
the train step needs (input and kernel; conv1's kernel only, as the step drops the image's gradient); PyTorch runs
the same layer as `torch.nn.functional.conv2d` / `max_pool2d` on channels_last tensors, eager. Both frameworks get
the same thread count; times are medians of --repeats calls after a warm-up, the calls rotated each repeat.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmark.machine import configure_threads
from jax_googlenet import host_memory
from jax_googlenet.ops import xla_kernels


def model_layers(image_size: int, batch: int) -> list[dict]:
    """Every conv (name, input shape, kernel, features, stride, padding) and max pool (input shape, window, stride,
    mode, pad) of the torchvision variant's inference forward, in order, as the kernel plan records them during
    one abstract forward."""
    from jax_googlenet import googlenet
    from jax_googlenet.ops import plan

    net = googlenet("torchvision", aux_logits=False)
    with plan.recording() as rows:
        jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), jnp.zeros((batch, image_size, image_size, 3))))
    found = []
    for row in rows:
        spec = dict(row.spec)
        name = row.name if row.kind == "conv" else f"pool {spec['window']}x{spec['window']}/{spec['stride']}"
        found.append({"kind": row.kind, "name": name, "shape": row.shape, **spec})
    return found


def jax_layer(layer: dict, impl: str, image_size: int):
    """(forward, forward + backward) jitted callables and their arguments for one layer, compiled with the
    step's options for `image_size` (`ops.compiler_options`)."""
    from jax_googlenet.ops import compiler_options, conv2d, max_pool

    jit = functools.partial(jax.jit, compiler_options=compiler_options(image_size))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=layer["shape"]), jnp.float32)
    if layer["kind"] == "pool":
        f = lambda x: max_pool(x, layer["window"], layer["stride"], layer["mode"], layer["pad"], impl)  # noqa: E731
        y = jax.eval_shape(f, x)
        dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
        return jit(f), (x,), jit(lambda x, dy: jax.vjp(f, x)[1](dy)), (x, dy)
    k = layer["k"]
    w = jnp.asarray(rng.normal(size=(k, k, layer["shape"][-1], layer["features"])) * 0.05, jnp.float32)
    f = lambda x, w: conv2d(x, w, layer["stride"], layer["padding"], impl)  # noqa: E731
    dy = jnp.asarray(rng.normal(size=jax.eval_shape(f, x, w).shape), jnp.float32)
    if layer["name"] == "conv1":  # the step never needs the image's gradient
        bwd = jit(lambda x, w, dy: jax.vjp(lambda w: f(x, w), w)[1](dy))
    else:
        bwd = jit(lambda x, w, dy: jax.vjp(f, x, w)[1](dy))
    return jit(f), (x, w), bwd, (x, w, dy)


def torch_layer(layer: dict, torch):
    """The same layer in PyTorch, channels_last: (forward, forward + backward) callables."""
    rng = np.random.default_rng(0)
    n, h, w, c = layer["shape"]
    x = torch.from_numpy(rng.normal(size=(n, c, h, w)).astype(np.float32)).contiguous(
        memory_format=torch.channels_last)
    F = torch.nn.functional
    if layer["kind"] == "pool":
        ceil = layer["mode"] == "ceil"
        f = lambda x: F.max_pool2d(x, layer["window"], layer["stride"], layer["pad"], ceil_mode=ceil)  # noqa: E731
        xg = x.clone().requires_grad_()
        dy = torch.randn_like(f(x))
        return (lambda: f(x)), (lambda: f(xg).backward(dy))
    k = layer["k"]
    wt = torch.from_numpy((rng.normal(size=(layer["features"], c, k, k)) * 0.05).astype(np.float32)).contiguous(
        memory_format=torch.channels_last)
    f = lambda x, w: F.conv2d(x, w, stride=layer["stride"], padding=layer["padding"])  # noqa: E731
    xg = x.clone().requires_grad_(layer["name"] != "conv1")
    wg = wt.clone().requires_grad_()
    dy = torch.randn_like(f(x, wt))

    def forward():
        with torch.no_grad():
            return f(x, wt)

    def backward():
        xg.grad = wg.grad = None
        f(xg, wg).backward(dy)

    return forward, backward


def run(args) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for layer in model_layers(args.image_size, args.batch_size):
        if args.only and not any(s in layer["name"] for s in args.only):
            continue
        ours = {impl: jax_layer(layer, impl, args.image_size) for impl in args.impls}
        theirs = torch_layer(layer, torch)
        for f, a, b, ba in ours.values():  # compile and warm up
            jax.block_until_ready(f(*a)), jax.block_until_ready(b(*ba))
        theirs[0](), theirs[1]()
        times = {key: [] for key in [*(f"{i} {p}" for i in args.impls for p in ("fwd", "f+b")), "torch fwd",
                                     "torch f+b"]}
        calls = [(f"{impl} fwd", lambda f=f, a=a: jax.block_until_ready(f(*a))) for impl, (f, a, _, _) in ours.items()]
        calls += [(f"{impl} f+b", lambda b=b, ba=ba: jax.block_until_ready(b(*ba)))
                  for impl, (_, _, b, ba) in ours.items()]
        calls += [("torch fwd", theirs[0]), ("torch f+b", theirs[1])]
        for rep in range(args.repeats):
            for key, call in calls[rep % len(calls):] + calls[:rep % len(calls)]:  # rotate who goes first
                t = time.perf_counter()
                call()
                times[key].append(1e3 * (time.perf_counter() - t))
        row = {"name": layer["name"], "shape": "x".join(map(str, layer["shape"])),
               "op": (f"{layer['k']}x{layer['k']}/{layer['stride']} -> {layer['features']}" if layer["kind"] == "conv"
                      else f"max {layer['window']}x{layer['window']}/{layer['stride']}"),
               **{key: statistics.median(v) for key, v in times.items()}}
        rows.append(row)
        print("  ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()), flush=True)
    return rows


def markdown(rows: list[dict], args) -> str:
    keys = [k for k in rows[0] if k not in ("name", "shape", "op")]
    lines = [f"Command: `python -m experiments.benchmark.layers {' '.join(sys.argv[1:])}`", "",
             f"ms per call, median of {args.repeats}; f+b = forward and the step's gradients; {args.host_memory}; "
             f"JAX: {xla_kernels(args.image_size)}.",
             "",
             "| layer | input (NHWC) | op | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['name']} | {r['shape']} | {r['op']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    total = {k: sum(r[k] for r in rows) for k in keys}
    lines.append("| **total** | | | " + " | ".join(f"{total[k]:.1f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark.layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--impls", default="winograd", help="comma-separated conv/pool implementations of ours")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: all this process may use)")
    p.add_argument("--only", default=None, help="comma-separated substrings of the layer names to keep")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc and JAX's CPU dispatch as they are (as the benchmark)")
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    args.host_memory = host_memory.configure(args.system_malloc)
    print(args.host_memory, flush=True)
    args.impls = args.impls.split(",")
    args.only = args.only.split(",") if args.only else None
    args.threads = configure_threads(args.threads)
    rows = run(args)
    text = markdown(rows, args)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
