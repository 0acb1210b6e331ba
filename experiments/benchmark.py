"""XLA performance benchmark: the project's jitted GoogLeNet against torchvision's googlenet in PyTorch.

    python -m experiments.benchmark                      # CPU defaults: batch 16, 224 px, float32, a few minutes
    python -m experiments.benchmark --frameworks jax --workloads train --repeats 1 --json /tmp/cell.json

One process measures every cell, alternating frameworks within each repeat so machine drift hits all of them.
JAX runs the project's own model and its real `train_step` (SGD momentum, aux heads, "paper" loss); PyTorch runs
torchvision's googlenet eagerly (NCHW and channels_last) and under `torch.compile`. Data is synthetic and already
on the device; timed windows synchronise only at their ends. See docs/benchmark.md for what each field means.

Nothing here imports tensorflow-datasets or grain, so it runs from the tree with PYTHONPATH=. on a bare machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_googlenet import compilation_cache, googlenet
from jax_googlenet.train import AUX_WEIGHT, create_train_state, jit_train_step, make_optimizer

FRAMEWORKS = ("jax", "torch")
WORKLOADS = ("eval", "train")
DTYPES = ("float32", "bfloat16")
TORCH_VARIANTS = ("eager", "channels_last", "compile")
NUM_CLASSES = 1000
LEARNING_RATE = 0.01  # any constant: the benchmark times the update, not its effect
MOMENTUM = 0.9

# Dense peak TFLOP/s per card: (float32 as the frameworks run it by default, i.e. TF32 tensor cores where both
# frameworks use them for convolutions, bfloat16). Vendor data sheets, without sparsity.
GPU_PEAK_TFLOPS = {
    "H200": (494.7, 989.4),
    "H100 PCIe": (378.0, 756.0),
    "H100": (494.7, 989.4),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    "A100": (156.0, 312.0),
    "L4": (60.0, 121.0),
}


class UsageError(Exception):
    """Bad input found after parsing: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, no usage block: the message says what to change."""
        self.exit(2, f"error: {message}\n")


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
    p = Parser(prog="python -m experiments.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--frameworks", type=csv(FRAMEWORKS), default=list(FRAMEWORKS))
    p.add_argument("--torch-variants", type=csv(TORCH_VARIANTS), default=["eager", "channels_last"],
                   help="default eager,channels_last: torch.compile of the train step takes minutes on a small CPU; "
                        "add compile to include it")
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


# ----------------------------------------------------------------------------------------------- machine


def configure_threads(threads: int | None) -> int:
    """Give both frameworks the same CPU thread count; must run before JAX's backend starts.

    XLA:CPU sizes its intra-op pool ("XLAEigen" threads) from $NPROC, else from the CPUs in this process's
    affinity mask (taskset); --xla_cpu_multi_thread_eigen does not change the pool's size.
    """
    n = threads or len(os.sched_getaffinity(0))
    os.environ["NPROC"] = str(n)
    return n


def xla_cpu_pool_threads() -> int:
    """Count XLA:CPU's intra-op threads (named tf_XLAEigen) that this process is running."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    return sum(n.endswith("XLAEigen") for n in names)


def cpu_info() -> dict[str, Any]:
    """CPU model, flags that decide the vector peak, and the clock from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda k: (re.search(rf"^{k}\s*:\s*(.*)$", text, re.M) or [None, ""])[1].strip()  # noqa: E731
    flags = set(field("flags").split())
    mhz = float(field("cpu MHz") or 0)
    max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_khz.exists():
        mhz, clock_src = int(max_khz.read_text()) / 1000, "cpuinfo_max_freq"
    else:
        clock_src = "/proc/cpuinfo cpu MHz (nominal; turbo may exceed it)"
    return {"model": field("model name") or platform.processor(), "vendor": field("vendor_id"),
            "family": int(field("cpu family") or 0), "model_number": int(field("model") or 0),
            "logical_cpus": os.cpu_count(), "mhz": mhz, "clock_source": clock_src,
            "avx512f": "avx512f" in flags, "avx2_fma": {"avx2", "fma"} <= flags,
            "avx512_bf16": "avx512_bf16" in flags or "amx_bf16" in flags}


def cpu_peak(info: dict[str, Any], threads: int, dtype: str) -> tuple[float, str]:
    """Peak FLOP/s of `threads` cores: cores x FLOP/cycle x clock, FLOP/cycle from the vector units."""
    if info["avx512f"] and info["vendor"] == "GenuineIntel":
        per_cycle, why = 64, "AVX-512, 2 FMA units x 16 float32 x 2"
    elif info["avx512f"] or info["avx2_fma"]:
        # AMD Zen 4 runs AVX-512 on two 256-bit FMA pipes: the same 32 FLOP/cycle as AVX2 on Zen 2/3.
        per_cycle, why = 32, "2 FMA pipes x 8 float32 x 2"
    else:
        per_cycle, why = 8, "SSE, no FMA"
    if dtype == "bfloat16" and info["avx512_bf16"]:
        per_cycle, why = 2 * per_cycle, why + ", x2 for bfloat16 dot products (avx512_bf16)"
    peak = threads * per_cycle * info["mhz"] * 1e6
    cores = f"{threads} core{'s' if threads > 1 else ''}"
    return peak, f"{cores} x {per_cycle} FLOP/cycle ({why}) x {info['mhz'] / 1000:.2f} GHz ({info['clock_source']})"


def gpu_peak(device_kind: str, dtype: str) -> tuple[float, str]:
    words = set(re.split(r"[\s_-]+", device_kind.lower()))
    for name, (f32, bf16) in GPU_PEAK_TFLOPS.items():
        if set(name.lower().split()) <= words:
            tflops = bf16 if dtype == "bfloat16" else f32
            what = "bfloat16 dense" if dtype == "bfloat16" else "TF32 dense (float32 convolutions use TF32)"
            return tflops * 1e12, f"{name} {what}: {tflops} TFLOP/s (data sheet)"
    raise UsageError(f"no known peak for GPU {device_kind!r}; pass --peak-tflops")


def machine_record(threads: int, torch_mod) -> dict[str, Any]:
    dev = jax.devices()[0]
    record = {
        "platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__,
        "flax": __import__("flax").__version__, "optax": __import__("optax").__version__,
        "numpy": np.__version__, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "NPROC": os.environ.get("NPROC"),
        "cpu": cpu_info(), "threads": threads, "hostname": platform.node(),
        "compile_cache_dir": jax.config.jax_compilation_cache_dir,
    }
    if torch_mod is not None:
        record.update(torch=torch_mod.__version__, torchvision=__import__("torchvision").__version__,
                      torch_threads=torch_mod.get_num_threads())
        if torch_mod.cuda.is_available():
            record.update(gpu=torch_mod.cuda.get_device_name(), cuda=torch_mod.version.cuda,
                          cudnn_allow_tf32=torch_mod.backends.cudnn.allow_tf32,
                          matmul_allow_tf32=torch_mod.backends.cuda.matmul.allow_tf32)
    return record


# ----------------------------------------------------------------------------------------------- memory


def _status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


def release_free_heap() -> bool:
    """Hand glibc's free heap pages back to the OS, so the next step's allocations show up in the RSS."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def rss_peak_of(run: Callable[[], None]) -> tuple[float, str]:
    """MB by which the resident set peaks above its size just before one more `run`, and how it was measured."""
    run()  # let allocators settle into their steady state first
    trimmed = release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    run()
    how = ("peak RSS growth during one step over the RSS before it (VmHWM reset through /proc/self/clear_refs"
           + (", free heap returned by malloc_trim first" if trimmed else ", no malloc_trim: not glibc")
           + "): the step's working memory; parameters, optimizer state and the batch already resident are not "
             "included")
    return (_status_kb("VmHWM") - before) / 1024, how


# ----------------------------------------------------------------------------------------------- JAX


class CacheEvents:
    """Counts JAX's persistent-cache hits, so a warm compile can prove it was served from disk."""

    def __init__(self):
        self.hits = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **_):
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1


@contextlib.contextmanager
def persistent_cache_bypassed():
    """Compile as a machine without the persistent cache would (the in-memory caches cleared too)."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()
    jax.clear_caches()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        cc.reset_cache()


def timed_compile(jitted, args: tuple) -> tuple[Any, float]:
    """Trace, lower and compile from scratch (in-memory caches cleared): the first call's overhead, with the
    garbage collector paused as the project's jobs pause it (`compilation_cache.gc_paused`)."""
    jax.clear_caches()
    t = time.perf_counter()
    with compilation_cache.gc_paused():
        compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t


def jax_compile(jitted, args: tuple, cache_on: bool, measure_cold: bool, events: CacheEvents) -> dict[str, Any]:
    """Compile times: cold (nothing cached) and warm (served by the persistent cache), and the executable."""
    out = {"compile_cold_s": None, "compile_warm_s": None, "warm_cache_hit": None}
    if not cache_on:
        out["compiled"], out["compile_cold_s"] = timed_compile(jitted, args)
        return out
    hits = events.hits
    compiled, seconds = timed_compile(jitted, args)
    if events.hits == hits:  # a miss: this was a cold compile (it also wrote the entry)
        out["compile_cold_s"] = seconds
        hits = events.hits
        compiled, seconds = timed_compile(jitted, args)
    out.update(compiled=compiled, compile_warm_s=seconds, warm_cache_hit=events.hits > hits)
    if out["compile_cold_s"] is None and measure_cold:
        with persistent_cache_bypassed():
            out["compile_cold_s"] = timed_compile(jitted, args)[1]
    return out


def cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def xla_memory_mb(compiled) -> float:
    """Bytes XLA's buffer assignment needs for one call: arguments, outputs and temporaries, donated buffers
    counted once."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2**20


class JaxRunner:
    """The project's model and its real jitted train step (or `train=False` apply), on synthetic device data."""

    framework, variant = "jax", "jit"

    def __init__(self, workload: str, batch: int, side: int, dtype: str, args, events: CacheEvents):
        self.workload = workload
        model = googlenet("torchvision", num_classes=NUM_CLASSES, aux_logits=True, dtype=jnp.dtype(dtype),
                          param_dtype=jnp.float32)
        rng = jax.random.key(0)
        self.state = create_train_state(rng, model, (batch, side, side, 3),
                                        make_optimizer(LEARNING_RATE, momentum=MOMENTUM))
        images = jax.random.normal(jax.random.key(1), (batch, side, side, 3), jnp.float32)
        labels = jax.random.randint(jax.random.key(2), (batch,), 0, NUM_CLASSES)
        if workload == "train":
            self.batch, self.rng = {"image": images, "label": labels}, jax.random.key(3)
            jitted, call_args = jit_train_step(loss_mode="paper"), (self.state, self.batch, self.rng)
        else:
            self.variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
            self.images = images
            jitted = jax.jit(lambda v, x: model.apply(v, x, train=False))
            call_args = (self.variables, images)
        info = jax_compile(jitted, call_args, not args.no_compile_cache, not args.skip_cold_compile, events)
        self.compiled = info.pop("compiled")
        self.compile_info = info
        self.first_call_s = info["compile_warm_s"] or info["compile_cold_s"]
        self.xla_flops = cost_flops(self.compiled)
        self.xla_memory_mb = xla_memory_mb(self.compiled)
        self.pending = []  # every output since the last sync: XLA may run independent eval calls concurrently

    def step(self) -> None:
        if self.workload == "train":
            self.state, metrics = self.compiled(self.state, self.batch, self.rng)
            self.pending.append(metrics)
        else:
            self.pending.append(self.compiled(self.variables, self.images))

    def sync(self) -> None:
        jax.block_until_ready((self.state, self.pending))
        self.pending = []


# ----------------------------------------------------------------------------------------------- PyTorch


def torch_compile_caches(enabled: bool) -> None:
    import torch._inductor.config as inductor_config
    inductor_config.force_disable_caches = not enabled


class TorchRunner:
    """torchvision's googlenet: eager NCHW, eager channels_last, or torch.compile (channels_last) of the model."""

    framework = "torch"

    def __init__(self, variant: str, workload: str, batch: int, side: int, dtype: str, args, torch):
        import torchvision
        self.torch, self.variant, self.workload = torch, variant, workload
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = dtype == "bfloat16"
        torch.manual_seed(0)
        model = torchvision.models.googlenet(weights=None, init_weights=True, aux_logits=True,
                                             num_classes=NUM_CLASSES).to(self.device)
        model.train(workload == "train")
        gen = torch.Generator(self.device).manual_seed(1)
        self.images = torch.randn(batch, 3, side, side, device=self.device, generator=gen)
        self.labels = torch.randint(0, NUM_CLASSES, (batch,), device=self.device, generator=gen)
        if variant != "eager":
            model = model.to(memory_format=torch.channels_last)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        self.compile_info = {"compile_cold_s": None, "compile_warm_s": None, "warm_cache_hit": None}
        self.net = model
        if variant == "compile":
            self._compile(args)
        else:
            self.first_call_s = self._first_call()

    def _first_call(self) -> float:
        t = time.perf_counter()
        self.step()
        self.sync()
        return time.perf_counter() - t

    def _compile(self, args) -> None:
        """torch.compile is lazy: its compile time is the first call's (one step included). As for JAX, a first
        try that misses Inductor's caches is the cold time, and the warm one is a try that hits them."""
        from torch._dynamo.utils import counters
        info = self.compile_info

        def first_call() -> tuple[float, bool]:
            hits = counters["inductor"]["fxgraph_cache_hit"]
            self.torch._dynamo.reset()
            self.net = self.torch.compile(self.model)
            return self._first_call(), counters["inductor"]["fxgraph_cache_hit"] > hits

        if args.no_compile_cache:
            info["compile_cold_s"] = first_call()[0]
        else:
            seconds, hit = first_call()
            if not hit:
                info["compile_cold_s"] = seconds
                seconds, hit = first_call()
            info.update(compile_warm_s=seconds, warm_cache_hit=hit)
            if info["compile_cold_s"] is None and not args.skip_cold_compile:
                torch_compile_caches(False)
                info["compile_cold_s"] = first_call()[0]
                torch_compile_caches(True)
                seconds, info["warm_cache_hit"] = first_call()  # leave the cached (warm) module for the timing
        self.first_call_s = info["compile_warm_s"] or info["compile_cold_s"]

    def loss(self, out):
        ce = self.torch.nn.functional.cross_entropy
        # torchvision's training outputs are (logits, aux_logits2, aux_logits1)
        return ce(out.logits, self.labels) + AUX_WEIGHT * (ce(out.aux_logits1, self.labels)
                                                           + ce(out.aux_logits2, self.labels))

    def forward(self):
        with self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.autocast):
            if self.workload == "train":
                return self.loss(self.net(self.images))
            return self.net(self.images)

    def step(self) -> None:
        if self.workload == "train":
            self.optimizer.zero_grad(set_to_none=True)
            self.forward().backward()
            self.optimizer.step()
        else:
            with self.torch.inference_mode():
                self.forward()

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def counted_flops(self) -> float:
        """PyTorch's FlopCounterMode over one step: matrix products and convolutions, 2 FLOPs per multiply-add."""
        from torch.utils.flop_counter import FlopCounterMode
        net, self.net = self.net, self.model  # count the eager graph; the compiled one is the same work
        with FlopCounterMode(display=False) as counter:
            self.step()
        self.net = net
        return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------- timing


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


def device_memory_mb(runner, torch) -> tuple[float, str]:
    """Peak memory of one step and how it was measured (see docs/benchmark.md)."""
    if jax.devices()[0].platform != "cpu":
        if runner.framework == "jax":
            return runner.xla_memory_mb, "XLA memory_analysis: arguments + outputs + temporaries - donated"
        torch.cuda.reset_peak_memory_stats()
        runner.step()
        runner.sync()
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated (state included)"

    def run():
        runner.step()
        runner.sync()
    return rss_peak_of(run)


# ----------------------------------------------------------------------------------------------- the run


def build_runners(workload, batch, dtype, args, frameworks, torch, events) -> list:
    runners = []
    if "jax" in frameworks:
        print(f"  compiling jax {workload} {dtype} batch {batch}", flush=True)
        runners.append(JaxRunner(workload, batch, args.image_size, dtype, args, events))
    if "torch" in frameworks and (dtype == "float32" or torch.cuda.is_available()):
        for variant in args.torch_variants:
            print(f"  preparing torch {variant} {workload} {dtype} batch {batch}", flush=True)
            runners.append(TorchRunner(variant, workload, batch, args.image_size, dtype, args, torch))
    elif "torch" in frameworks:
        print(f"  no PyTorch cells for {dtype}: bf16 autocast is measured on GPU only")
    return runners


def measure_config(workload, batch, dtype, args, frameworks, torch, events, peaks) -> tuple[list, dict]:
    """All variants of one (workload, batch, dtype): warm-up, then repeats that alternate the variants."""
    runners = build_runners(workload, batch, dtype, args, frameworks, torch, events)
    if not runners:
        return [], {}
    for r in runners:
        for _ in range(args.warmup):
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
    flops = check["xla_flops"] or check["torch_flops"]
    source = "XLA cost_analysis of the JAX step" if check["xla_flops"] else "torch FlopCounterMode"
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
        cells.append(cell)
    best_torch = max((c["images_per_s"]["median"] for c in cells if c["framework"] == "torch"), default=None)
    for c in cells:
        c["vs_best_torch"] = c["images_per_s"]["median"] / best_torch if best_torch else None
    return cells, check


def run(args) -> dict[str, Any]:
    threads = configure_threads(args.threads)
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
                          {"dtypes": dtypes, "threads": threads},
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


# ----------------------------------------------------------------------------------------------- reports


def cell_name(c: dict) -> str:
    return "JAX jit" if c["framework"] == "jax" else {"eager": "PyTorch eager NCHW",
                                                       "channels_last": "PyTorch eager channels_last",
                                                       "compile": "PyTorch torch.compile"}[c["variant"]]


def fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def cell_line(c: dict) -> str:
    ips = c["images_per_s"]
    return (f"{cell_name(c):28s} {ips['median']:8.2f} img/s [{ips['min']:.2f}, {ips['max']:.2f}]  "
            f"{c['ms_per_step']['median']:8.1f} ms/step  MFU {100 * c['mfu']:5.1f}%  "
            + (f"x{c['vs_best_torch']:.2f} vs best PyTorch" if c["vs_best_torch"] else "no PyTorch cell"))


def markdown(result: dict) -> str:
    m = result["machine"]
    plural = "s" if m["threads"] > 1 else ""
    device = m.get("gpu") or f"{m['cpu']['model']} ({m['threads']} thread{plural} each)"
    lines = [f"Command: `{result['command']}`", "",
             f"Device: {device}; jax {m['jax']}, torch {m.get('torch', '-')}, torchvision "
             f"{m.get('torchvision', '-')}; XLA_FLAGS={m['XLA_FLAGS'] or '(none)'}", ""]
    for dtype, p in result["peak"].items():
        lines.append(f"Peak {dtype}: {p['tflops'] * 1e3:.0f} GFLOP/s = {p['how']}")
    lines.append("")
    keys = sorted({(c["workload"], c["dtype"], c["batch_size"], c["image_size"]) for c in result["cells"]},
                  key=lambda k: (WORKLOADS.index(k[0]), DTYPES.index(k[1]), k[2]))
    for workload, dtype, batch, side in keys:
        lines += [f"### {workload}, {dtype}, batch {batch}, {side}x{side}", "",
                  "| variant | images/s median [min, max] | ms/step | first call s (cold / warm) | peak MB | "
                  "GFLOP/s | MFU | vs best PyTorch |", "|---|---|---|---|---|---|---|---|"]
        for c in result["cells"]:
            if (c["workload"], c["dtype"], c["batch_size"], c["image_size"]) != (workload, dtype, batch, side):
                continue
            ips = c["images_per_s"]
            first = (f"{fmt(c['compile_cold_s'], '.1f')} / {fmt(c['compile_warm_s'], '.1f')}"
                     if c["framework"] == "jax" or c["variant"] == "compile" else f"{c['first_call_s']:.1f} (eager)")
            lines.append(f"| {cell_name(c)} | {ips['median']:.2f} [{ips['min']:.2f}, {ips['max']:.2f}] | "
                         f"{c['ms_per_step']['median']:.1f} | {first} | {c['peak_memory_mb']:.0f} | "
                         f"{c['achieved_tflops'] * 1e3:.1f} | {100 * c['mfu']:.1f}% | {fmt(c['vs_best_torch'])} |")
        lines.append("")
    lines += ["### FLOPs per step: XLA cost analysis vs PyTorch FlopCounterMode", "",
              "| workload | dtype | batch | image | XLA GFLOP | PyTorch GFLOP | XLA / PyTorch |",
              "|---|---|---|---|---|---|---|"]
    for f in result["flops_check"]:
        g = lambda x: fmt(x and x / 1e9, ".2f")  # noqa: E731
        lines.append(f"| {f['workload']} | {f['dtype']} | {f['batch_size']} | {f['image_size']} | "
                     f"{g(f['xla_flops'])} | {g(f['torch_flops'])} | {fmt(f.get('xla_over_torch'), '.3f')} |")
    cells = result["cells"]
    memory = sorted({c["memory_method"] for c in cells})
    lines += ["", "XLA counts fewer convolution FLOPs (it skips multiply-adds on the zero padding, which PyTorch's "
              "counter includes) and adds elementwise work (BatchNorm, ReLU, pooling, loss, update) that PyTorch's "
              "counter ignores; both count 2 FLOPs per multiply-add.", "",
              "Peak MB: " + "; ".join(memory) + ".", "",
              "First call: JAX's is trace + lower + compile (cold: nothing cached; warm: the executable loaded from "
              "the persistent cache; -: not measured); torch.compile's is its first call, one step included "
              "(warm: Inductor's FX-graph cache hit); eager PyTorch's is its first step."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = result["cells"]
    groups = sorted({(c["workload"], c["dtype"], c["batch_size"]) for c in cells})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.5), squeeze=False)
    for ax, (workload, dtype, batch) in zip(axes[0], groups):
        sel = [c for c in cells if (c["workload"], c["dtype"], c["batch_size"]) == (workload, dtype, batch)]
        med = [c["images_per_s"]["median"] for c in sel]
        err = [[m - c["images_per_s"]["min"] for m, c in zip(med, sel)],
               [c["images_per_s"]["max"] - m for m, c in zip(med, sel)]]
        ax.barh([cell_name(c) for c in sel], med, xerr=err, color=["C0" if c["framework"] == "jax" else "C1"
                                                                    for c in sel])
        ax.set_title(f"{workload}, {dtype}, batch {batch}")
        ax.set_xlabel("images/s (median, min-max)")
    fig.suptitle(result["machine"].get("gpu") or result["machine"]["cpu"]["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_outputs(result: dict, args, final: bool = True) -> None:
    """Write each requested file whole (through a temporary name), so nothing is left half-written; the plot
    only at the end."""
    outputs = [(args.json, lambda p: p.write_text(json.dumps(result, indent=1) + "\n")),
               (args.markdown, lambda p: p.write_text(markdown(result))),
               (args.plot if final else None, lambda p: plot(result, p))]
    for path, write in outputs:
        if path is None:
            continue
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        write(tmp)
        tmp.replace(path)
        if final:
            print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_outputs(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
