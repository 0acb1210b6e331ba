"""The jobs' figures: the training curves (curves.png) and the confusion matrix (confusion.png), written
atomically as PNGs with matplotlib's Agg backend."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from experiments.rundir import write_atomic


def curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy against epochs, train and test, as a PNG."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax2.plot(epochs, [h["test_accuracy"] for h in history], "o-", label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    write_png(fig, path)


def confusion(matrix, classes: list[str], path: Path, *, title: str) -> None:
    """Each true class's row as fractions of its images (the diagonal is its accuracy), as a PNG; class names
    on the axes up to 30 classes."""
    plt = _pyplot()
    matrix = np.asarray(matrix, float)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(12, 4 + 0.3 * len(classes))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    shown = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if len(classes) <= 30:  # names shown literally: a folder named price_$5_to_$10 is not mathtext
        ax.set_xticks(range(len(classes)), classes, rotation=90, parse_math=False)
        ax.set_yticks(range(len(classes)), classes, parse_math=False)
    write_png(fig, path)


def write_png(fig, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically (`write_atomic`); the figure is closed."""
    plt = _pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported when a job first plots (it costs a second at start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
