"""Training progress on stderr, in the form that suits where stderr goes.

A terminal gets tqdm's live bar (images done, images/s, the latest loss), redrawn in place. Anything else (a
file, a pipe, a CI log) gets a plain line every tenth of the epoch or every 30 s, whichever comes first, with the
latest loss and the images/s since the previous line. A redrawn bar sent to a file keeps every redraw, one per
step when a step outlasts tqdm's 0.1 s refresh: 128 carriage-return updates for 2 epochs of the default MNIST
run on the 4,000 shipped digits (62 steps an epoch), about 1,900 on full MNIST (937); the lines are 10 to 11 an
epoch (the 30 s rule adds one while the first step compiles).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm

LINES_PER_TOTAL = 10  # a line at each tenth of the total
EVERY_SECONDS = 30.0  # and at least this often


def bar(total: int, *, desc: str, initial: int = 0, unit: str = "img", disable: bool = False,
        file: TextIO | None = None):
    """A progress display for `total` units starting at `initial`: `update(n, loss=...)` (the loss optional, for
    evaluation), then `close()` (or use it as a context manager). tqdm's bar when `file` (default stderr) is a
    terminal, plain lines otherwise."""
    file = sys.stderr if file is None else file
    if disable:
        return Progress()
    if file.isatty():
        return Bar(total, desc=desc, initial=initial, unit=unit, file=file)
    return Lines(total, desc=desc, initial=initial, unit=unit, file=file)


class Progress:
    """Shows nothing (processes other than the first of a multi-process run); the two below show something."""

    def update(self, n: int, *, loss: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Bar(Progress):
    """tqdm's bar, the loss as its postfix."""

    def __init__(self, total: int, *, desc: str, initial: int, unit: str, file: TextIO):
        self.tqdm = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=file, dynamic_ncols=True)

    def update(self, n: int, *, loss: float | None = None) -> None:
        if loss is not None:
            self.tqdm.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.tqdm.update(n)

    def close(self) -> None:
        self.tqdm.close()


class Lines(Progress):
    """One line per tenth of `total` or per EVERY_SECONDS, whichever comes first:
    `epoch 1/7: 1,216/3,968 img (31%), loss 0.4113, 412.9 img/s`."""

    def __init__(self, total: int, *, desc: str, initial: int, unit: str, file: TextIO,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.file, self.clock = total, desc, unit, file, clock
        self.done = self.last_done = initial
        self.last_time = clock()
        self.next_mark = self._mark_after(initial)

    def _mark_after(self, done: int) -> float:
        """The first tenth of the total above `done` (integers: the last one is the total itself)."""
        if self.total <= 0:
            return float("inf")
        tenth = done * LINES_PER_TOTAL // self.total + 1
        return -(-tenth * self.total // LINES_PER_TOTAL)

    def update(self, n: int, *, loss: float | None = None) -> None:
        self.done += n
        now = self.clock()
        if self.done < self.next_mark and now - self.last_time < EVERY_SECONDS:
            return
        rate = (self.done - self.last_done) / max(now - self.last_time, 1e-9)
        percent = 100 * self.done / self.total if self.total else 100
        shown_loss = "" if loss is None else f", loss {loss:.4f}"
        print(f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({percent:.0f}%){shown_loss}, "
              f"{rate:.1f} {self.unit}/s", file=self.file, flush=True)
        self.last_done, self.last_time = self.done, now
        self.next_mark = self._mark_after(self.done)
