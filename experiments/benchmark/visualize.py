"""python -m experiments.benchmark.visualize: feature visualisation here against lucent (torch-lucent 0.1.8, the
PyTorch port of Lucid), side by side on the same weights.

Both sides render the same channels of one layer (default: 16 channels of inception4a, one image each, in one batch)
of torchvision's GoogLeNet (its init under seed 0, BatchNorm's statistics calibrated on noise images, converted here
by `convert`): 128x128 images in Lucid's Fourier parameterisation with decorrelated colour, ImageNet normalisation,
Adam at lr 0.05 for 256 steps. Two settings: transforms off (the final objectives must agree: same method, different
random starts) and lucent's `standard_transforms` on both sides (the speed comparison: channels rendered per
second). The final objective is each channel's mean activation on the final, untransformed image. Ours is timed
after one compilation (reported apart); each side runs once. Besides wall-clock seconds it reports each side's CPU
seconds (this process's, all threads), the fairer figure on a CPU shared with other work. Prints a table; `--json`
writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from experiments.benchmark.machine import configure_threads


def torch_googlenet(seed: int = 0, size: int = 128, calibration_batches: int = 4):
    """torchvision's GoogLeNet (no aux heads, no transform_input) with its init under `seed` and BatchNorm's
    running statistics those of `calibration_batches` batches of 16 uniform-noise images (ImageNet-normalised,
    `size` pixels): every layer's activations then have unit scale and depend on the input. Randomised statistics
    (`convert.torchvision.randomise_batch_norm`, as the parity tests use) leave inception4a's channels constant in
    the input at this init, whose kernels have std 0.01: both renderers then end where they start."""
    import torch
    import torchvision
    from torchvision.transforms import Normalize

    from jax_googlenet import imagenet

    torch.manual_seed(seed)
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the population statistics of the batches below
    normalize = Normalize(mean=imagenet.MEAN, std=imagenet.STD)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    with torch.no_grad():
        for _ in range(calibration_batches):
            model(normalize(torch.rand(16, 3, size, size, generator=generator)))
    return model.eval()


def run_lucent(model, layer: str, channels: list[int], size: int, steps: int, lr: float, transforms: bool,
               seed: int) -> tuple[float, float, list[float]]:
    """(seconds, CPU seconds of this process, final objective per channel) of lucent's render_vis on `model`."""
    import torch
    from lucent.optvis import objectives, param, render, transform
    from torchvision.transforms import Normalize

    from jax_googlenet import imagenet

    torch.manual_seed(seed)
    objective = sum(objectives.channel(layer, c, batch=i) for i, c in enumerate(channels))
    images = []

    def param_f():
        params, image_f = param.image(size, batch=len(channels))
        images.append(image_f)
        return params, image_f

    start, cpu = time.perf_counter(), time.process_time()
    render.render_vis(model, objective, param_f, optimizer=lambda p: torch.optim.Adam(p, lr=lr),
                      transforms=list(transform.standard_transforms) if transforms else [], thresholds=(steps,),
                      progress=False, show_image=False, fixed_image_size=size)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    acts = {}
    hook = getattr(model, layer).register_forward_hook(lambda m, i, o: acts.update(out=o))
    with torch.no_grad():
        model(Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])(images[0]()))
    hook.remove()
    final = [float(acts["out"][i, c].mean()) for i, c in enumerate(channels)]
    return seconds, cpu, final


def run_ours(model, variables, layer: str, channels: list[int], size: int, steps: int, lr: float,
             transforms: bool, seed: int) -> tuple[float, float, float, list[float]]:
    """(compile seconds, render seconds, its CPU seconds, final objective per channel) of our `render`."""
    import jax

    from jax_googlenet.imagenet import MEAN, STD
    from jax_googlenet.visualize import channel, render
    from jax_googlenet.visualize import transforms as T

    kw = dict(lr=lr, size=size, transforms=T.STANDARD if transforms else T.NONE, mean=MEAN, std=STD)
    objective = channel(layer, channels)
    start = time.perf_counter()
    render(model, variables, objective, steps=1, key=jax.random.key(seed + 1), **kw)  # compiles the step
    compile_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    result = render(model, variables, objective, steps=steps, key=jax.random.key(seed), **kw)
    return (compile_s, time.perf_counter() - start, time.process_time() - cpu, [float(v) for v in result.final])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark.visualize",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", default="inception4a")
    p.add_argument("--channels", type=int, default=16, help="channels 0 .. N-1, one image each (default 16)")
    p.add_argument("--size", type=int, default=128, help="image side (lucent's default 128)")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=None, help="CPU threads of both frameworks (default: all)")
    p.add_argument("--settings", default="off,standard", help="transform settings to run: off, standard or both")
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",")]
    if not settings or any(s not in ("off", "standard") for s in settings) or args.steps < 1 or args.channels < 1:
        print("error: --settings takes off, standard or off,standard; --steps and --channels must be positive",
              file=sys.stderr)
        return 2
    threads = configure_threads(args.threads)  # before JAX's backend starts
    import numpy as np
    import torch

    from convert import torchvision_to_flax
    from experiments.benchmark.machine import machine_record
    from jax_googlenet.model import googlenet

    torch.set_num_threads(threads)
    tmodel = torch_googlenet(size=args.size)
    model = googlenet("torchvision", aux_logits=False)
    variables = torchvision_to_flax(tmodel.state_dict(), aux=False, model=model)
    channels = list(range(args.channels))
    rows = []
    for setting in settings:
        on = setting == "standard"
        common = (args.layer, channels, args.size, args.steps, args.lr, on, 0)
        lucent_s, lucent_cpu, lucent_final = run_lucent(tmodel, *common)
        compile_s, ours_s, ours_cpu, ours_final = run_ours(model, variables, *common)
        rows.append({"transforms": setting, "lucent_s": lucent_s, "ours_s": ours_s, "ours_compile_s": compile_s,
                     "lucent_cpu_s": lucent_cpu, "ours_cpu_s": ours_cpu, "cpu_ratio": lucent_cpu / ours_cpu,
                     "lucent_channels_per_s": len(channels) / lucent_s, "ours_channels_per_s": len(channels) / ours_s,
                     "speed_ratio": lucent_s / ours_s, "lucent_final": lucent_final, "ours_final": ours_final,
                     "final_ratio": float(np.sum(ours_final) / np.sum(lucent_final))})
    print(f"{len(channels)} channels of {args.layer}, {args.size}x{args.size}, {args.steps} Adam steps at lr "
          f"{args.lr:g}, {threads} threads; final objective = mean over the channels of each one's mean activation")
    print(f"{'transforms':10} {'lucent s':>9} {'ours s':>8} {'(compile)':>9} {'ch/s lucent':>11} {'ch/s ours':>9} "
          f"{'ratio':>6} {'CPU-s ratio':>11} {'final lucent':>12} {'final ours':>10} {'ours/lucent':>11}")
    for r in rows:
        print(f"{r['transforms']:10} {r['lucent_s']:9.1f} {r['ours_s']:8.1f} {r['ours_compile_s']:9.1f} "
              f"{r['lucent_channels_per_s']:11.3f} {r['ours_channels_per_s']:9.3f} {r['speed_ratio']:5.2f}x "
              f"{r['cpu_ratio']:10.2f}x "
              f"{np.mean(r['lucent_final']):12.3f} {np.mean(r['ours_final']):10.3f} {r['final_ratio']:11.3f}")
    if args.json:
        record = {"args": vars(args), "machine": machine_record(threads, torch), "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
