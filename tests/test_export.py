"""Export for serving: the ONNX graph (onnxruntime against the Flax model and against torchvision's own ONNX
export), StableHLO (`jax.export`) against `model.apply`, and the export CLI's output and its bad inputs.

Tolerances are relative errors ||a - b|| / ||b||. ONNX: 1e-5, the issue's bound; at 224 pixels onnxruntime and
XLA (and torch) are each 4-6e-6 from a float64 torch reference on these weights, float32 summation order over 22
layers. StableHLO: 1e-6; it is the same XLA computation as `model.apply` at the same batch size (measured 0).
"""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
import skimage.data
import torch
import torchvision

from convert.torchvision import randomise_batch_norm
from convert import torchvision_to_flax
from experiments import export as export_cli
from jax_googlenet import export
from jax_googlenet.checkpoint import default_serving, load_serving, save_model
from jax_googlenet.imagenet import preprocess
from jax_googlenet.model import accepted_sides, googlenet

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # conftest.py: compiled for what it computes

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def photos(side: int) -> np.ndarray:
    """Seven real photographs, ImageNet-normalised, side x side (NHWC float32)."""
    return np.stack([np.asarray(preprocess(getattr(skimage.data, p)()[..., :3], resize=round(side * 256 / 224),
                                           crop=side)) for p in PHOTOS]).astype(np.float32)


def session(proto_or_bytes) -> onnxruntime.InferenceSession:
    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    return onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def torchvision_pair():
    """(torchvision model, our model, variables): 10 classes, transform_input, BatchNorm's scale and bias
    randomised and its running statistics those of the photos, so every layer passes a signal on (at
    torchvision's init with unit statistics the logits hardly depend on the image)."""
    torch.manual_seed(0)
    tm = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=10,
                                      transform_input=True)
    randomise_batch_norm(tm)
    for m in tm.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0  # the running statistics become the batch's
    with torch.no_grad():
        tm.train()(torch.from_numpy(photos(224).transpose(0, 3, 1, 2)))
    model = googlenet("torchvision", num_classes=10, aux_logits=False, transform_input=True, impl="xla")
    return tm.eval(), model, torchvision_to_flax(tm.state_dict(), aux=False, model=model)


def flax_logits(model, variables, x):
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def init(model, side: int, seed: int = 0, channels: int = 3):
    """Random variables in numpy (faster than tracing flax's initialisers): He-normal kernels, so the signal
    keeps its scale through the layers, BatchNorm's parameters and statistics away from their defaults."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, channels)))

    def draw(path, a):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(a.shape[:-1])), a.shape).astype(np.float32)
        low, high = {"scale": (0.5, 1.5), "var": (0.5, 1.5)}.get(name, (-0.1, 0.1))
        return rng.uniform(low, high, a.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def serving_of(model):
    return default_serving(dict(num_classes=model.num_classes, in_channels=model.in_channels))


# ----------------------------------------------------------------------------------------------- ONNX


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript-based exporter, asked for
@pytest.mark.parametrize("side, batch", [(224, 7), (225, 1)])
def test_onnx_torchvision_variant_matches_flax_and_torchvisions_own_export(torchvision_pair, side, batch):
    """225 pixels: every ceil-mode pool keeps a last partial window (112 -> 57 -> 29 -> 15 -> 8)."""
    tm, model, variables = torchvision_pair
    x = photos(side)[:batch]
    ours = session(export.onnx_model(model, variables, serving_of(model), image_size=side))
    got = ours.run(["logits"], {"images": x})[0]
    assert got.shape == (batch, 10)
    assert rel(got, flax_logits(model, variables, x)) <= 1e-5
    buf = io.BytesIO()
    torch.onnx.export(tm, torch.zeros(1, 3, side, side), buf, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    ref = session(buf.getvalue()).run(["y"], {"x": x.transpose(0, 3, 1, 2)})[0]
    assert rel(got, ref) <= 1e-5


@pytest.mark.parametrize("variant", ["paper", "writeup"])
def test_onnx_paper_and_writeup_variants_match_flax_at_batch_1_and_7(variant):
    side = max(accepted_sides(variant, aux=False)[0], 48)  # writeup: 125, its smallest; paper: 48
    model = googlenet(variant, num_classes=10, aux_logits=False, impl="xla")
    variables = init(model, side)
    s = session(export.onnx_model(model, variables, serving_of(model), image_size=side))
    x = np.random.default_rng(0).normal(size=(7, side, side, 3)).astype(np.float32)
    ref = flax_logits(model, variables, x)
    for batch in (1, 7):
        assert rel(s.run(["logits"], {"images": x[:batch]})[0], ref[:batch]) <= 1e-5


def test_onnx_graph_is_opset_17_checked_and_each_conv_feeds_its_relu(torchvision_pair):
    _, model, variables = torchvision_pair
    proto = export.onnx_model(model, variables, serving_of(model), image_size=224)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 57  # conv1-3 and 6 per inception block
    assert all(consumers[n.output[0]] == ["Relu"] for n in convs)
    pools = [n for n in proto.graph.node if n.op_type == "MaxPool"]
    strided = [n for n in pools if list(onnx.helper.get_attribute_value(a) for a in n.attribute
                                        if a.name == "strides")[0] == [2, 2]]
    assert len(strided) == 4 and all(
        any(a.name == "ceil_mode" and a.i == 1 for a in n.attribute) for n in strided)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 224, 224, 3]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[export.METADATA_KEY])
    assert meta["image_size"] == 224 and len(meta["class_names"]) == 10


def test_onnx_paper_variant_has_its_lrn():
    model = googlenet("paper", num_classes=10, aux_logits=False)
    ops = [n.op_type for n in export.onnx_model(model, init(model, 64), serving_of(model), image_size=64).graph.node]
    assert ops.count("LRN") == 2 and ops.count("Conv") == 57


# ----------------------------------------------------------------------------------------------- StableHLO


@pytest.fixture(scope="module")
def small_model():
    """A 3-class torchvision-variant model at 64 pixels."""
    model = googlenet("torchvision", num_classes=3, aux_logits=True, impl="xla")
    return model, init(model, 64)


def test_stablehlo_runs_without_the_flax_model_at_any_batch(small_model, tmp_path):
    model, variables = small_model
    serving = {**serving_of(model), "image_size": 64, "resize_size": 73}
    files = export.export(model, variables, serving, tmp_path / "m.stablehlo", format="stablehlo", image_size=64)
    assert files == [tmp_path / "m.stablehlo", tmp_path / "m.stablehlo.json"]
    exported = jax.export.deserialize(bytearray((tmp_path / "m.stablehlo").read_bytes()))
    assert exported.platforms == ("cpu", "cuda")
    assert str(exported.in_avals[0].shape[0]) == "batch"
    loaded = export.load(tmp_path / "m.stablehlo")
    assert loaded.serving["resize_size"] == 73 and loaded.input_shape == (None, 64, 64, 3)
    x = np.random.default_rng(1).normal(size=(5, 64, 64, 3)).astype(np.float32)
    apply = jax.jit(lambda x: model.apply(variables, x, train=False))  # variables as constants, as exported
    for batch in (1, 5):
        assert rel(loaded(x[:batch]), apply(x[:batch])) <= 1e-6
    with pytest.raises(ValueError, match="takes float32 images of shape Nx64x64x3"):
        loaded(x[:, :32])


def test_uint8_input_normalises_inside_the_graph(small_model, tmp_path):
    model, variables = small_model
    serving = serving_of(model)
    pixels = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    normalised = ((pixels / 255.0 - np.asarray(serving["mean"])) / np.asarray(serving["std"])).astype(np.float32)
    ref = flax_logits(model, variables, normalised)
    for fmt in export.FORMATS:
        path = tmp_path / f"m.{fmt}"
        export.export(model, variables, serving, path, format=fmt, image_size=64, uint8_input=True)
        loaded = export.load(path)
        assert loaded.input_dtype == np.uint8
        assert rel(loaded(pixels), ref) <= 1e-5


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(small_model, tmp_path_factory):
    """A fine-tuned model as the jobs write it: model/ with 3 class names and 64-pixel crops."""
    model, variables = small_model
    path = tmp_path_factory.mktemp("run") / "model"
    save_model(path, variables, dict(variant="torchvision", num_classes=3, in_channels=3, aux_logits=True,
                                     transform_input=False),
               dict(image_size=64, resize_size=73, class_names=["square", "circle", "triangle"]))
    return path


def test_export_cli_writes_the_file_and_prints_its_signature(model_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_cli.main(["--weights", str(model_dir.parent), "--format", "onnx", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "image size 64 (the model's" in text and f"wrote {out} (" in text
    assert "images: float32[batch, 64, 64, 3] -> logits: float32[batch, 3]" in text
    assert export.load(out).serving["class_names"] == ["square", "circle", "triangle"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left


def test_model_directory_without_serving_metadata_takes_its_runs_config(model_dir, tmp_path):
    import shutil

    old = tmp_path / "run" / "model"
    shutil.copytree(model_dir, old)
    shutil.rmtree(old / "serving")  # as save_model wrote before it kept serving metadata
    assert load_serving(old)["class_names"] == ["0", "1", "2"] and load_serving(old)["image_size"] == 224
    (old.parent / "config.json").write_text(json.dumps({"classes": ["a", "b", "c"], "image_size": 96}))
    serving = load_serving(old)
    assert (serving["class_names"], serving["image_size"], serving["resize_size"]) == (["a", "b", "c"], 96, 96)
    assert serving["mean"] == pytest.approx([0.485, 0.456, 0.406]) and serving["transform_input"] is False


def _refused(capsys, tmp_path, argv, words):
    before = sorted(tmp_path.rglob("*"))
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_export_cli_bad_input_is_one_line_exit_2_and_nothing_written(model_dir, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    weights = ["--weights", str(model_dir)]
    _refused(capsys, tmp_path, [*weights, "--format", "tflite", "--out", out], "--format tflite: unknown")
    (tmp_path / "bad.pth").write_text("not a state dict")
    _refused(capsys, tmp_path, ["--weights", str(tmp_path / "bad.pth"), "--format", "onnx", "--out", out],
             "not a GoogLeNet state dict")
    (tmp_path / "empty").mkdir()
    _refused(capsys, tmp_path, ["--weights", str(tmp_path / "empty"), "--format", "onnx", "--out", out],
             "not a model directory")
    _refused(capsys, tmp_path, [*weights, "--format", "onnx", "--out", out, "--image-size", "8"],
             "accepts sides of")
    (tmp_path / "taken.stablehlo.json").write_text("{}")
    _refused(capsys, tmp_path, [*weights, "--format", "stablehlo", "--out", str(tmp_path / "taken.stablehlo")],
             "exists already")
    _refused(capsys, tmp_path, [*weights, "--format", "onnx", "--out", str(tmp_path / "m.stablehlo")],
             "name a .onnx file")


def test_benchmark_runs_the_exported_graph_in_onnxruntime():
    import argparse

    from experiments.benchmark.runners import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(2, 32, argparse.Namespace(threads=1))
    runner.step()
    runner.sync()
    assert runner.logits.shape == (2, 1000) and np.isfinite(runner.logits).all()
    assert runner.session.get_session_options().intra_op_num_threads == 1
    assert (runner.framework, runner.variant, runner.workload) == ("onnxruntime", "cpu", "eval")
    assert runner.first_call_s > 0


def test_an_export_at_another_image_size_keeps_the_models_resize_ratio():
    serving = dict(image_size=64, resize_size=73, mean=[0.5], std=[0.5], class_names=["a"])
    assert export._metadata(serving, 96, uint8_input=False)["resize_size"] == 110  # 96 * 73 / 64 = 109.5
    assert export._metadata(serving, 64, uint8_input=True)["resize_size"] == 73
