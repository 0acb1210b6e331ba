"""XLA performance benchmark: the project's jitted GoogLeNet against torchvision's googlenet in PyTorch.

    python -m experiments.benchmark                      # CPU defaults: batch 16, 224 px, float32, a few minutes
    python -m experiments.benchmark --frameworks jax --workloads train --repeats 1 --json /tmp/cell.json

One process measures every cell, alternating frameworks within each repeat so machine drift hits all of them.
JAX runs the project's own model and its real `train_step` (SGD momentum, aux heads, "paper" loss); PyTorch runs
torchvision's googlenet eagerly (NCHW and channels_last) and under `torch.compile`. Data is synthetic and already
on the device; timed windows synchronise only at their ends. See docs/benchmark.md for what each field means.

Nothing here imports tensorflow-datasets or grain, so it runs from the tree with PYTHONPATH=. on a bare machine.
"""

from experiments.benchmark.cli import main

__all__ = ["main"]
