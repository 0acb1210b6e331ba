"""``tfds`` and ``auto``: full MNIST through `tfds.data_source` (reading a prepared dataset needs no TensorFlow).

``auto`` takes tfds when MNIST is prepared in the data dir, or when TensorFlow (needed to prepare it) is
installed and the network answers within 2 s; else the shipped sample. It never waits on TFDS's minutes of
download retries.
"""

from __future__ import annotations

import importlib.util
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from jax_googlenet.data.sample import load_sample
from jax_googlenet.data.source import DataError, Dataset

# Where TFDS downloads MNIST from; the probe asks it for headers (a bare TCP connect can be answered by a proxy).
PROBE_URL, PROBE_TIMEOUT_S = "https://storage.googleapis.com/cvdf-datasets/mnist/", 2.0


def load_auto(data_dir: str | None) -> Dataset:
    """tfds or the sample, as `choose_auto` decides; prints what it chose and why."""
    source, why, splits = choose_auto(data_dir)
    print(f"data: {source} ({why})", flush=True)
    if source == "tfds":  # opened or probed already: no second open, network probe or TensorFlow check
        return load_tfds(data_dir, splits, checked=True)
    return load_sample()


def choose_auto(data_dir: str | None) -> tuple[str, str, Any]:
    """("tfds" or "sample", why, the opened TFDS splits or None)."""
    where = _tfds_dir(data_dir)
    splits = open_tfds(data_dir)
    if splits is not None:
        return "tfds", f"MNIST is prepared in {where}", splits
    if not tensorflow_installed():
        return "sample", (f"MNIST is not prepared in {where} and preparing it needs TensorFlow, which is not "
                          f"installed: using the 5,000 digits shipped in the package"), None
    if network_answers():
        return "tfds", f"MNIST is not prepared in {where} but {_host()} answers: downloading it", None
    return "sample", (f"MNIST is not prepared in {where} and {_host()} does not answer within "
                      f"{PROBE_TIMEOUT_S:g} s: using the 5,000 digits shipped in the package"), None


def tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def network_answers(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `url` (default PROBE_URL) gives an HTTP answer, any status, within `timeout` seconds."""
    answered = []

    def probe():  # in a thread: urlopen's timeout does not bound a hanging DNS lookup
        try:
            urllib.request.urlopen(urllib.request.Request(url or PROBE_URL, method="HEAD"), timeout=timeout)
            answered.append(True)
        except urllib.error.HTTPError:  # a status code is an answer
            answered.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _host() -> str:
    return urllib.parse.urlsplit(PROBE_URL).netloc


def _tfds_dir(data_dir: str | None) -> str:
    import tensorflow_datasets as tfds

    return str(data_dir or tfds.core.constants.DATA_DIR)


def open_tfds(data_dir: str | None, download: bool = False):
    """[train, test] random-access sources of a prepared MNIST (array_record), or None when there is none."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source("mnist", split=["train", "test"], data_dir=data_dir, download=download)
    except (NotImplementedError, FileNotFoundError, AssertionError, KeyError):  # not (fully) prepared, or tfrecord
        if download:
            raise
        return None


def load_tfds(data_dir: str | None, splits=None, *, checked: bool = False) -> Dataset:
    """Full MNIST from `tfds.data_source` (60,000 train, 10,000 test); downloads and prepares it if needed.
    `splits`: already opened ones; `checked`: the network and TensorFlow were found there already."""
    if splits is None and not checked:
        splits = open_tfds(data_dir)
    if splits is None and not checked:
        if not network_answers():
            raise DataError(f"MNIST is not prepared (as array_record) in {_tfds_dir(data_dir)} and {_host()} does "
                            f"not answer; use --data sample or --data idx:DIR offline")
        if not tensorflow_installed():  # TFDS needs it to prepare (not to read) a dataset
            raise DataError("preparing MNIST with TFDS the first time needs TensorFlow: "
                            "pip install tensorflow-cpu (reading it afterwards does not)")
    if splits is None:
        print(f"data: downloading and preparing MNIST in {_tfds_dir(data_dir)}", flush=True)
        splits = open_tfds(data_dir, download=True)
    train, test = splits
    return Dataset(f"tfds mnist ({len(train):,} train / {len(test):,} test)", train, test)
