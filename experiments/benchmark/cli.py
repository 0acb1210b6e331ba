"""`python -m experiments.benchmark`: the flags and their checks, then the run: for every (workload, dtype,
batch) it builds the runners, warms them up, times windows that alternate the variants, measures memory and
FLOPs, and rewrites the requested reports after each group. `main` returns the exit status: 0, or 2 after a
one-line error for bad input.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import jax

from experiments.benchmark.machine import (configure_threads, cpu_peak, gpu_peak, machine_record,
                                          xla_cpu_pool_threads)
from experiments.benchmark.memory import device_memory_mb
from experiments.benchmark.reports import cell_line, write_outputs
from experiments.benchmark.runners import (DTYPES, FRAMEWORKS, INFERENCE_ONLY_VARIANTS, TORCH_VARIANTS, WORKLOADS,
                                          CacheEvents, JaxRunner, OnnxRuntimeRunner, TorchRunner,
                                          torch_compile_caches)
from experiments.benchmark.timing import spread, steps_per_window, time_window
from experiments.cli import Parser, UsageError
from jax_googlenet import compilation_cache, host_memory, ops

DESCRIPTION = "XLA performance benchmark: the project's jitted GoogLeNet against torchvision's googlenet in PyTorch."


# ----------------------------------------------------------------------------------------------- arguments


def csv(choices: tuple[str, ...] | None = None, cast: Callable = str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [cast(t.strip()) for t in text.split(",") if t.strip()]
        bad = [i for i in items if choices and i not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices or ('values',))}"
                                             f"; got {text!r}")
        return items
    return parse


def positive_int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas; got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m experiments.benchmark", description=DESCRIPTION)
    p.add_argument("--frameworks", type=csv(FRAMEWORKS), default=list(FRAMEWORKS))
    p.add_argument("--torch-variants", type=csv(TORCH_VARIANTS), default=["eager", "channels_last"],
                   help="default eager,channels_last: torch.compile of the train step takes minutes on a small CPU; "
                        "add compile to include it, compile_frozen for torch.compile with frozen weights (eval only)")
    p.add_argument("--workloads", type=csv(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--batch-sizes", type=positive_int_list, default=[16])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtypes", type=csv(DTYPES), default=None,
                   help="default float32 on CPU, float32,bfloat16 on GPU")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per cell; the median is reported")
    p.add_argument("--min-window-s", type=float, default=2.0, help="each timed window runs at least this long")
    p.add_argument("--steps", type=int, default=None, help="fixed steps per window (overrides --min-window-s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both frameworks (default: the CPUs this process may run on)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak to state MFU against (default: detected)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="turn off JAX's persistent compilation cache and PyTorch Inductor's caches")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc and JAX's asynchronous CPU dispatch as they are (default: both "
                        "frameworks' freed blocks are kept for reuse, JAX's CPU steps run on the calling thread)")
    p.add_argument("--compile-cache-dir", default=None, help="default $JAX_GOOGLENET_CACHE_DIR or "
                   "~/.cache/jax_googlenet/xla")
    p.add_argument("--skip-cold-compile", action="store_true",
                   help="do not recompile with the caches bypassed to measure the cold compile time")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    if args.image_size < 15:
        p.error(f"--image-size must be at least 15 (torchvision's googlenet needs it); got {args.image_size}")
    for name in ("repeats", "warmup", "threads", "steps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be {'non-negative' if name == 'warmup' else 'positive'}; got {value}")
    for path in (args.json, args.markdown, args.plot):
        if path is not None and not path.parent.resolve().is_dir():
            p.error(f"output directory {path.parent} does not exist")
    return args


# ----------------------------------------------------------------------------------------------- the run


def build_runners(workload, batch, dtype, args, frameworks, torch, events) -> list:
    runners = []
    if "jax" in frameworks:
        print(f"  compiling jax {workload} {dtype} batch {batch}", flush=True)
        runners.append(JaxRunner(workload, batch, args.image_size, dtype, args, events))
    if "torch" in frameworks and (dtype == "float32" or torch.cuda.is_available()):
        for variant in args.torch_variants:
            if variant in INFERENCE_ONLY_VARIANTS and workload != "eval":
                print(f"  no torch {variant} {workload} cell: that variant is inference only")
                continue
            print(f"  preparing torch {variant} {workload} {dtype} batch {batch}", flush=True)
            runners.append(TorchRunner(variant, workload, batch, args.image_size, dtype, args, torch))
    elif "torch" in frameworks:
        print(f"  no PyTorch cells for {dtype}: bf16 autocast is measured on GPU only")
    if "onnxruntime" in frameworks and workload == "eval" and dtype == "float32":
        print(f"  preparing onnxruntime {workload} {dtype} batch {batch}", flush=True)
        runners.append(OnnxRuntimeRunner(batch, args.image_size, args))
    return runners


def measure_config(workload, batch, dtype, args, frameworks, torch, events, peaks) -> tuple[list, dict]:
    """All variants of one (workload, batch, dtype): warm-up, then repeats that alternate the variants."""
    runners = build_runners(workload, batch, dtype, args, frameworks, torch, events)
    if not runners:
        return [], {}
    for r in runners:
        # A torch.compile variant built before another one recompiles on its next call (the later one's
        # first call resets Dynamo's caches): at least one untimed call takes that recompile.
        for _ in range(max(args.warmup, int(r.variant.startswith("compile")))):
            r.step()
        r.sync()
    steps = {id(r): steps_per_window(r, args) for r in runners}
    seconds = {id(r): [] for r in runners}
    for rep in range(args.repeats):
        for r in runners[rep % len(runners):] + runners[:rep % len(runners)]:  # rotate who goes first
            seconds[id(r)].append(time_window(r, steps[id(r)]))
    jax_runner = next((r for r in runners if r.framework == "jax"), None)
    torch_runner = next((r for r in runners if r.framework == "torch"), None)
    check = {"workload": workload, "batch_size": batch, "image_size": args.image_size, "dtype": dtype,
             "xla_flops": jax_runner.xla_flops if jax_runner else None,
             "torch_flops": torch_runner.counted_flops() if torch_runner else None}
    if check["xla_flops"] and check["torch_flops"]:
        check["xla_over_torch"] = check["xla_flops"] / check["torch_flops"]
    # The direct convolutions' count for every variant when PyTorch runs: XLA's cost analysis counts what the
    # compiled step does, Winograd's fewer products and a loop's body once (not per iteration).
    flops = check["torch_flops"] or check["xla_flops"]
    source = "torch FlopCounterMode" if check["torch_flops"] else "XLA cost_analysis of the JAX step"
    cells = []
    for r in runners:
        per_step = seconds[id(r)]
        memory_mb, memory_method = device_memory_mb(r, torch)
        median = statistics.median(per_step)
        cell = {"framework": r.framework, "variant": r.variant, "workload": workload, "dtype": dtype,
                "batch_size": batch, "image_size": args.image_size, "steps_per_window": steps[id(r)],
                "repeats": args.repeats, "ms_per_step": spread([1e3 * s for s in per_step]),
                "images_per_s": spread([batch / s for s in per_step]),
                "first_call_s": r.first_call_s, **r.compile_info,
                "peak_memory_mb": memory_mb, "memory_method": memory_method,
                "flops_per_step": flops, "flops_source": source,
                "achieved_tflops": flops / median / 1e12, "peak_tflops": peaks[dtype][0] / 1e12,
                "mfu": flops / median / peaks[dtype][0]}
        if r.framework == "jax":
            cell["xla_memory_mb"] = r.xla_memory_mb
        if getattr(r, "inference", None):
            cell["inference"] = r.inference  # how BatchNorm is computed, where it is folded
        cells.append(cell)
    best_torch = max((c["images_per_s"]["median"] for c in cells if c["framework"] == "torch"), default=None)
    for c in cells:
        c["vs_best_torch"] = c["images_per_s"]["median"] / best_torch if best_torch else None
    return cells, check


def run(args) -> dict[str, Any]:
    threads = configure_threads(args.threads)
    # One process runs both frameworks: the allocator setting applies to each alike.
    memory_line = host_memory.configure(args.system_malloc)
    print(memory_line, flush=True)
    frameworks = args.frameworks
    torch = None
    if "torch" in frameworks:
        # JAX must not take most of a GPU's memory up front when PyTorch shares the card.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import torch
        torch.set_num_threads(threads)
    platform_name = jax.devices()[0].platform  # starts the backend, after NPROC is set
    on_gpu = platform_name == "gpu"
    if torch is not None and on_gpu != torch.cuda.is_available():
        raise UsageError(f"JAX runs on {platform_name} but PyTorch {'sees' if not on_gpu else 'does not see'} "
                         "a GPU; install matching builds so both use the same device")
    dtypes = args.dtypes or (["float32", "bfloat16"] if on_gpu else ["float32"])
    if args.dtypes is None:
        print(f"dtypes: {','.join(dtypes)} (default on {platform_name})")
    if args.no_compile_cache:
        compilation_cache.disable()
        print("persistent compilation caches: off")
    else:
        path = compilation_cache.enable(args.compile_cache_dir)
        print(f"persistent compilation cache: {path}")
    if torch is not None:
        torch_compile_caches(not args.no_compile_cache)
    events = CacheEvents()
    machine = machine_record(threads, torch)
    peaks = {}
    for dtype in dtypes:
        if args.peak_tflops:
            peaks[dtype] = (args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops}")
        elif on_gpu:
            peaks[dtype] = gpu_peak(machine["device_kind"], dtype)
        else:
            peaks[dtype] = cpu_peak(machine["cpu"], threads, dtype)
    result = {"command": "python -m experiments.benchmark " + " ".join(sys.argv[1:]), "machine": machine,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} |
                          {"dtypes": dtypes, "threads": threads, "host_memory": memory_line,
                           "xla_compiler_options": {d: ops.compiler_options(args.image_size, d) for d in dtypes},
                           "xla_inference_compiler_options": {
                               d: ops.compiler_options(args.image_size, d, step="inference") for d in dtypes},
                           "xla_kernels": {d: ops.xla_kernels(args.image_size, d) for d in dtypes}},
              "peak": {d: {"tflops": p / 1e12, "how": how} for d, (p, how) in peaks.items()},
              "flops_check": [], "cells": [], "complete": False}
    for workload in args.workloads:
        for dtype in dtypes:
            for batch in args.batch_sizes:
                print(f"{workload} {dtype} batch {batch} image {args.image_size}", flush=True)
                cells, check = measure_config(workload, batch, dtype, args, frameworks, torch, events, peaks)
                for c in cells:
                    print("  " + cell_line(c), flush=True)
                result["cells"] += cells
                result["flops_check"] += [check] if check else []
                if not on_gpu and machine.get("xla_cpu_pool_threads") is None and "jax" in frameworks:
                    machine["xla_cpu_pool_threads"] = xla_cpu_pool_threads()
                write_outputs(result, args, final=False)  # a run cut short keeps the cells it finished
    if not on_gpu:
        print(f"threads: {threads} (PyTorch: torch.set_num_threads; XLA:CPU: pool sized by NPROC, "
              f"{machine.get('xla_cpu_pool_threads', '-')} XLAEigen threads counted)")
    result["complete"] = True
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_outputs(result, args)
    return 0
