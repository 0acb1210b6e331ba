"""Faults a user can meet, from the user's side: one test per case found by trying to break the jobs, and a
seeded mutation fuzzer over the files the jobs read (images, IDX, config.json, model directories). Every case
loads, or fails as documented: in process with the one `DataError` (or the documented error), through a command
with exit status 2, one line on stderr, no traceback, nothing written outside the test's directory."""

from __future__ import annotations

import numpy as np

from experiments import plots


def test_class_names_are_shown_literally_in_the_confusion_plot(tmp_path):
    """A class folder named price_$5_to_$10 is a name, not mathtext (matplotlib's parser raises on it)."""
    path = tmp_path / "confusion.png"
    plots.confusion(np.eye(3), ["price_$5_to_$10", "$", "a_b^c"], path, title="top-1 $1.0000, 3 images")
    assert path.read_bytes().startswith(b"\x89PNG")
