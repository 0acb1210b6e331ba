"""The machine a run measures and the peaks its MFU is stated against: the CPU thread count both frameworks
get (set before JAX's backend starts), the CPU's model, vector units and clock, a CPU peak from those, a GPU peak
from data-sheet figures, the count of XLA:CPU's pool threads, and the record of versions and device that goes
into the JSON. Bad input raises the jobs' `experiments.cli.UsageError`: one line, exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.cli import UsageError

# Dense peak TFLOP/s per card: (float32 as the frameworks run it by default, i.e. TF32 tensor cores where both
# frameworks use them for convolutions, bfloat16). Vendor data sheets, without sparsity.
GPU_PEAK_TFLOPS = {
    "H200": (494.7, 989.4),
    "H100 PCIe": (378.0, 756.0),
    "H100": (494.7, 989.4),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    "A100": (156.0, 312.0),
    "L4": (60.0, 121.0),
}


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
