"""The three report formats of one result: a line per cell on stdout, the Markdown tables of
benchmarks/RESULTS.md, and a bar chart of images/s (PNG); `write_outputs` writes each requested file whole,
through a temporary name, after every cell group and once more at the end with the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments.benchmark.runners import DTYPES, WORKLOADS


def cell_name(c: dict) -> str:
    if c["framework"] == "onnxruntime":
        return "onnxruntime CPU (exported ONNX)"
    if c["framework"] == "jax":
        return "JAX jit, folded BatchNorm" if c.get("inference") == "folded BatchNorm" else "JAX jit"
    return {"eager": "PyTorch eager NCHW", "channels_last": "PyTorch eager channels_last",
            "compile": "PyTorch torch.compile", "compile_frozen": "PyTorch torch.compile frozen"}[c["variant"]]


def fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def cell_line(c: dict) -> str:
    ips = c["images_per_s"]
    return (f"{cell_name(c):32s} {ips['median']:8.2f} img/s [{ips['min']:.2f}, {ips['max']:.2f}]  "
            f"{c['ms_per_step']['median']:8.1f} ms/step  MFU {100 * c['mfu']:5.1f}%  "
            + (f"x{c['vs_best_torch']:.2f} vs best PyTorch" if c["vs_best_torch"] else "no PyTorch cell"))


def markdown(result: dict) -> str:
    m = result["machine"]
    plural = "s" if m["threads"] > 1 else ""
    device = m.get("gpu") or f"{m['cpu']['model']} ({m['threads']} thread{plural} each)"
    lines = [f"Command: `{result['command']}`", "",
             f"Device: {device}; jax {m['jax']}, torch {m.get('torch', '-')}, torchvision "
             f"{m.get('torchvision', '-')}; XLA_FLAGS={m['XLA_FLAGS'] or '(none)'}", "",
             f"{result['settings'].get('host_memory', 'host memory: not recorded')}, for both frameworks", "",
             *(f"JAX {d}: {kernels}; XLA compiler options "
               f"{result['settings'].get('xla_compiler_options', {}).get(d) or '(none)'}, for inference "
               f"{result['settings'].get('xla_inference_compiler_options', {}).get(d) or '(none)'}"
               for d, kernels in result["settings"].get("xla_kernels", {}).items()), ""]
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
                     if c["framework"] == "jax" or c["variant"].startswith("compile") else
                     f"{c['first_call_s']:.1f} ({'session' if c['framework'] == 'onnxruntime' else 'eager'})")
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
    lines += ["", "GFLOP/s and MFU divide PyTorch's count (the direct convolutions' multiply-adds, 2 FLOPs each) by "
              "each variant's step time when PyTorch runs, XLA's otherwise. XLA's cost analysis counts the compiled "
              "step's own work: Winograd's fewer products, no multiply-adds on the zero padding, the elementwise ops "
              "that PyTorch's counter ignores, and a loop's body once rather than per iteration.", "",
              "Peak MB: " + "; ".join(memory) + ".", "",
              "First call: JAX's is trace + lower + compile (cold: nothing cached; warm: the executable loaded from "
              "the persistent cache; -: not measured); torch.compile's is its first call, one step included "
              "(warm: Inductor's FX-graph cache hit; a frozen graph bypasses that cache, so it has a cold time "
              "only); eager PyTorch's is its first step; onnxruntime's is its session's creation and first run.", "",
              "JAX jit, folded BatchNorm: eval on variables whose BatchNorms are folded into the convolutions once, "
              "outside the timed step (`jax_googlenet.fold`). PyTorch torch.compile frozen: Inductor's `freezing` "
              "under `torch.no_grad()`, which folds BatchNorm into the convolutions when it compiles."]
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
