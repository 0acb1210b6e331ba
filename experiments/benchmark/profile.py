"""`python -m experiments.benchmark.profile`: where the benchmark's JAX step spends its time, layer by layer, from
JAX's profiler: the time of each XLA thunk of a few calls, joined to the layer its HLO instruction came from.

    python -m experiments.benchmark.profile --batch-size 16 --image-size 224 [--workload eval|train] [--calls 5]

The step is the benchmark's own (`experiments.benchmark.runners.JaxRunner`: for eval the folded model on prepared
variables, for train the real train step), with the benchmark's host-memory settings. A thunk is attributed to the
layer named in its instruction's `op_name` (the Flax module path after `GoogLeNet._forward`; "pools" for the
network's own max pools; "(other)" for the rest: the loss and the optimizer, and copies XLA adds); its kind is the
fusion's or operation's name without its number. XLA:CPU's convolutions and dots run their kernels as tasks of its
threadpool that no event names (conv1's event is its ~50 us dispatch): that time goes to the convolutions and dots
in flight when it ran (`thunk_times`). Thunks on the pool's two threads overlap, so the attributed sum can exceed
the wall time per call; the profiler itself adds ~15%.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from experiments.benchmark.machine import configure_threads
from jax_googlenet import host_memory

# Profiler events that are not XLA thunks: the runtime's own spans, the Python trace, transfers.
RUNTIME_EVENTS = ("Thunk", "Pjit", "Device", "H2D", "D2H", "$", "PjRt", "ParseArguments", "CommonPjRt",
                  "Handle inputs", "SlinkyThreadPool", "ThreadpoolListener", "end: ")


def op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name: its metadata op_name} of a compiled module's text."""
    names = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            names[m.group(1)] = m.group(2)
    return names


def layer_of(op_name: str) -> str:
    """The Flax module path after `GoogLeNet._forward` in `op_name` (two levels: block/branch), "pools" for the
    network's max pools, "(other)" otherwise."""
    parts = op_name.split("/")
    at = [i for i, p in enumerate(parts) if p.endswith("._forward")]
    if not at:
        return "(other)"
    rest = [p for p in parts[at[-1] + 1:] if not p.startswith(("jvp(", "transpose("))]
    if not rest or rest[0].startswith("GoogLeNet."):
        return "pools"
    return "/".join(rest[:2]) if rest[0].startswith("inception") else rest[0]


# XLA:CPU's convolution and dot thunks hand their kernel to the threadpool: the convolution's event is its dispatch
# (~50 us for conv1, whose work takes milliseconds), and the kernel runs as pool tasks that no event names until the
# thunk's "end: NAME" event.
LIBRARY_THUNKS = ("conv_general_dilated", "convolution", "dot", "ynn_fusion", "custom-call")
REGION = ("ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion")


def thunk_times(trace_dir: Path) -> collections.Counter:
    """{thunk name: total microseconds} of the profiler's perfetto trace: each thunk's own events, plus the time of
    the threadpool's regions that no thunk event covers, split evenly between the convolutions and dots in flight
    (from their event's start to their "end:" event) at its midpoint; pool time with none in flight is left out."""
    path = next(trace_dir.rglob("*.trace.json.gz"))
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    events = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    total = collections.Counter()
    by_thread = collections.defaultdict(list)
    flights, ends = [], collections.defaultdict(list)  # (start, end, name) of the library thunks
    for e in events:
        name = e["name"]
        if name.startswith("end: "):
            ends[name[5:]].append(e["ts"])
        if name in REGION:
            by_thread[e["tid"]].append(e)
        elif not name.startswith(RUNTIME_EVENTS):
            total[name] += e["dur"]
            by_thread[e["tid"]].append(e)
            if name.startswith(LIBRARY_THUNKS):
                flights.append([e["ts"], e["ts"] + e["dur"], name])
    for f in flights:  # each occurrence ends at the first "end:" of its name after it starts (`ends` in time order)
        i = bisect.bisect_left(ends[f[2]], f[0])
        if i < len(ends[f[2]]):
            f[1] = max(f[1], ends[f[2]][i])
    unnamed = []  # (midpoint, microseconds) of region time outside any named event
    for thread in by_thread.values():
        opened = None
        for e in thread:
            if e["name"] == REGION[0]:
                opened = e["ts"]
                continue
            if opened is None:
                continue  # a thunk outside any region
            if e["ts"] > opened:
                unnamed.append(((opened + e["ts"]) / 2, e["ts"] - opened))
            opened = None if e["name"] == REGION[1] else e["ts"] + e["dur"]  # a named thunk: the region goes on
    flights.sort()
    flying, i = [], 0
    for mid, us in sorted(unnamed):  # a sweep: the thunks started by `mid`, less those ended by it
        while i < len(flights) and flights[i][0] <= mid:
            flying.append(flights[i])
            i += 1
        flying = [f for f in flying if f[1] > mid]
        for f in flying:
            total[f[2]] += us / len(flying)
    return total


def profile(workload: str, batch: int, side: int, calls: int, compile_cache: bool = True) -> dict:
    """Per-layer and per-kind milliseconds per call of the benchmark's JAX `workload` step, and its wall ms
    (`compile_cache`: JAX's persistent compilation cache, as the benchmark uses it)."""
    import jax

    from experiments.benchmark.runners import CacheEvents, JaxRunner

    args = SimpleNamespace(no_compile_cache=not compile_cache, skip_cold_compile=True)
    runner = JaxRunner(workload, batch, side, "float32", args, CacheEvents())
    for _ in range(2):
        runner.step()
    runner.sync()
    names = op_names(runner.compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                runner.step()
                runner.sync()
        wall_ms = (time.perf_counter() - start) * 1000 / calls
        times = thunk_times(Path(tmp))
    layers, kinds = collections.Counter(), collections.Counter()
    for name, us in times.items():
        layers[layer_of(names.get(name, ""))] += us / 1000 / calls
        kinds[re.sub(r"[.\d]+$", "", name)] += us / 1000 / calls
    return {"layers": layers, "kinds": kinds, "wall_ms": wall_ms,
            "inference": getattr(runner, "inference", None)}


def markdown(result: dict, args) -> str:
    total = sum(result["layers"].values())
    lines = [f"Command: `python -m experiments.benchmark.profile --workload {args.workload} --batch-size "
             f"{args.batch_size} --image-size {args.image_size} --calls {args.calls}`", "",
             f"{args.workload} step, batch {args.batch_size}, {args.image_size}x{args.image_size}, float32"
             + (f" ({result['inference']})" if result["inference"] else "")
             + f": {result['wall_ms']:.1f} ms per call under the profiler, {total:.1f} ms of thunks attributed", "",
             "| layer | ms per call | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {100 * v / total:.1f}% |" for k, v in result["layers"].most_common()]
    lines += ["", "| kind (XLA fusion or operation) | ms per call | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {100 * v / total:.1f}% |" for k, v in result["kinds"].most_common(args.kinds)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="eval", choices=("eval", "train"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--calls", type=int, default=5, help="profiled calls after two untimed ones (default 5)")
    p.add_argument("--kinds", type=int, default=15, help="rows of the per-kind table (default 15)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all this process may use)")
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.batch_size, args.image_size, args.calls, args.kinds) < 1:
        p.error("--batch-size, --image-size, --calls and --kinds must be at least 1")
    print(host_memory.configure(False), flush=True)
    configure_threads(args.threads)
    text = markdown(profile(args.workload, args.batch_size, args.image_size, args.calls), args)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
