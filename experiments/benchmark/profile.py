"""`python -m experiments.benchmark.profile`: where the benchmark's JAX step spends its time, layer by layer, from
JAX's profiler: the time of each XLA thunk of a few calls, joined to the layer its HLO instruction came from.

    python -m experiments.benchmark.profile --batch-size 16 --image-size 224 [--workload eval|train] [--calls 5]

The step is the benchmark's own (`experiments.benchmark.runners.JaxRunner`: for eval the folded model on prepared
variables, for train the real train step), with the benchmark's host-memory settings. A thunk is attributed to the
layer named in its instruction's `op_name` (the Flax module path after `GoogLeNet._forward`; "pools" for the
network's own max pools; "(other)" for the rest: the loss and the optimizer, and copies XLA adds); its kind is the
fusion's or operation's name without its number. Thunks that run on the library's worker threads overlap the
calling thread's, so the attributed sum can exceed the wall time per call; the profiler itself adds ~15%.
"""

from __future__ import annotations

import argparse
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
                  "Handle inputs", "SlinkyThreadPool", "end: ")


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


def thunk_times(trace_dir: Path) -> collections.Counter:
    """{event name: total microseconds} of the complete events in the profiler's perfetto trace."""
    path = next(trace_dir.rglob("*.trace.json.gz"))
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(RUNTIME_EVENTS):
            total[e["name"]] += e["dur"]
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
