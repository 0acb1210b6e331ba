"""The predict CLI end to end: ImageNet's top 5 against torchvision's, a fine-tuned model's own class names,
exported files (ONNX, StableHLO) giving the model's predictions, folders, --top-k, --json and bad input."""

import json

import jax
import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from flax import traverse_util
from PIL import Image

from experiments import export as export_cli
from experiments import predict
from jax_googlenet.checkpoint import save_model
from jax_googlenet.imagenet import categories
from jax_googlenet.model import googlenet
from test_export import init

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # conftest.py: compiled for what it computes

WEIGHTS = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
CLASSES = ["square", "circle", "triangle"]


def test_predict_prints_top5_for_each_image(pth_file, tmp_path, capsys, torchvision_state_dict):
    paths = []
    for photo in ("chelsea", "coffee"):
        paths.append(tmp_path / f"{photo}.png")
        Image.fromarray(getattr(skimage.data, photo)()).save(paths[-1])
    assert predict.main(["--weights", str(pth_file), *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    blocks = [lines[i:i + 6] for i in range(1, len(lines), 6)]
    assert [b[0] for b in blocks] == list(map(str, paths))
    # The same top-5 as torchvision's model with these weights on torchvision's preprocessing.
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    model.load_state_dict({k: v for k, v in torchvision_state_dict.items() if not k.startswith("aux")})
    names = categories()
    for block, photo in zip(blocks, ("chelsea", "coffee")):
        x = WEIGHTS.transforms()(torch.from_numpy(getattr(skimage.data, photo)()).permute(2, 0, 1))
        with torch.no_grad():
            probs = model.eval()(x[None]).softmax(-1)[0]
        top = probs.topk(5)
        expected = [f"{p:7.2%}  {names[c]}" for p, c in zip(top.values.tolist(), top.indices.tolist())]
        assert [ln.strip() for ln in block[1:]] == [e.strip() for e in expected]


def test_predict_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "x.png").write_text("not an image")
    assert predict.main(["--weights", str(tmp_path / "missing.pth"), str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert predict.main(["--weights", str(tmp_path), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A run directory as the fine-tune job leaves it: model/ with 3 class names, 64-pixel crops of 73-pixel
    resizes; and a folder of photographs with a file that is no image."""
    model = googlenet("torchvision", num_classes=3, aux_logits=True)
    run = tmp_path_factory.mktemp("run")
    save_model(run / "model", init(model, 64), dict(variant="torchvision", num_classes=3, in_channels=3,
                                                    aux_logits=True, transform_input=False),
               dict(image_size=64, resize_size=73, class_names=CLASSES))
    images = tmp_path_factory.mktemp("images")
    for photo in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(skimage.data, photo)()).save(images / f"{photo}.png")
    (images / "notes.jpg").write_text("not an image")
    return run, images


def predictions(capsys, weights, images, *flags):
    assert predict.main(["--weights", str(weights), str(images), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_names_a_fine_tuned_models_classes_and_skips_unreadable_files(fine_tuned, capsys):
    run, images = fine_tuned
    assert predict.main(["--weights", str(run), str(images), "--top-k", "2"]) == 0
    out = capsys.readouterr()
    assert out.err.strip() == f"skipped {images / 'notes.jpg'}: cannot read an image (UnidentifiedImageError)"
    lines = out.out.splitlines()
    assert lines[0::3] == [str(images / f"{p}.png") for p in ("astronaut", "chelsea", "coffee")]
    assert all(line.split()[-1] in CLASSES for i, line in enumerate(lines) if i % 3)
    result = predictions(capsys, run / "model", images, "--top-k", "3")
    assert [r["image"] for r in result] == lines[0::3]
    for r in result:
        assert sorted(t["class"] for t in r["top_k"]) == sorted(CLASSES)
        assert sum(t["probability"] for t in r["top_k"]) == pytest.approx(1, abs=1e-5)
        assert [CLASSES[t["index"]] for t in r["top_k"]] == [t["class"] for t in r["top_k"]]


def test_predict_skips_an_image_over_the_resize_budget_in_a_folder_naming_it(fine_tuned, capsys, tmp_path):
    """A 1x20000 PNG among the photographs would resize to 73 x 1,460,000 pixels: skipped, its path named."""
    run, images = fine_tuned
    for photo in ("astronaut", "chelsea", "coffee"):
        (tmp_path / f"{photo}.png").write_bytes((images / f"{photo}.png").read_bytes())
    Image.new("RGB", (1, 20_000)).save(tmp_path / "line.png")
    assert predict.main(["--weights", str(run), str(tmp_path), "--json", "--top-k", "1"]) == 0
    out = capsys.readouterr()
    assert [r["image"] for r in json.loads(out.out)] == [str(tmp_path / f"{p}.png")
                                                         for p in ("astronaut", "chelsea", "coffee")]
    assert out.err.startswith(f"skipped {tmp_path / 'line.png'}: 1x20000 resizes to 73x1460000"), out.err
    assert out.err.count("\n") == 1


@pytest.mark.parametrize("fmt, flags", [("onnx", []), ("stablehlo", ["--uint8-input"])])
def test_predict_on_an_exported_file_gives_the_models_predictions(fine_tuned, capsys, tmp_path, fmt, flags):
    """The same crops through the exported function: uint8 crops normalised inside or float32 ones outside;
    probabilities within 1e-5 (float32 rounding of a different summation order)."""
    run, images = fine_tuned
    out = tmp_path / f"model.{fmt}"
    assert export_cli.main(["--weights", str(run), "--format", fmt, "--out", str(out), *flags]) == 0
    capsys.readouterr()
    ours = predictions(capsys, out, images, "--top-k", "3")
    ref = predictions(capsys, run, images, "--top-k", "3")
    assert [[t["class"] for t in r["top_k"]] for r in ours] == [[t["class"] for t in r["top_k"]] for r in ref]
    got = np.array([[t["probability"] for t in r["top_k"]] for r in ours])
    want = np.array([[t["probability"] for t in r["top_k"]] for r in ref])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_predict_bad_flags_are_one_line_and_exit_2(fine_tuned, capsys, tmp_path):
    run, images = fine_tuned
    for flags, words in ((["--top-k", "4"], "--top-k 4: the model has 3 classes"),
                         (["--top-k", "0"], "--top-k 0: choose 1 or more"),
                         (["--weights", str(tmp_path / "m.onnx")], "no such file"),
                         ([str(tmp_path / "missing")], "no such file or directory")):
        argv = ["--weights", str(run), str(images), *flags]
        assert predict.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    assert predict.main(["--weights", str(tmp_path / "broken.onnx"), str(images)]) == 2
    assert "not an exported model" in capsys.readouterr().err


def test_predict_reads_grey_images_for_a_one_channel_model(tmp_path, capsys):
    """An MNIST-style model directory written without serving metadata: 32-pixel digits, MNIST's
    normalisation and the classes "0" to "9" by default."""
    model = googlenet("torchvision", num_classes=10, in_channels=1, aux_logits=False)
    config = dict(variant="torchvision", num_classes=10, in_channels=1, aux_logits=False, transform_input=False)
    save_model(tmp_path / "model", init(model, 32, channels=1), config)
    Image.fromarray(skimage.data.camera()).save(tmp_path / "digit.png")
    result = predictions(capsys, tmp_path / "model", tmp_path / "digit.png", "--top-k", "10")
    assert sorted(t["class"] for t in result[0]["top_k"]) == sorted(str(i) for i in range(10))


def test_predict_runs_the_folded_model_its_step_holding_no_batch_norm(fine_tuned):
    """The Flax path folds BatchNorm (and prepares its kernels' weights) once, outside the step: the step takes
    no batch_stats and computes no BatchNorm (no rsqrt in its StableHLO, which the unfolded step has); its
    logits are the model's within 1e-5 relative (float32 rounding of the folded kernels, the bound of
    tests/test_parity.py)."""
    from experiments.export import read_weights
    from test_export import flax_logits, rel

    model, variables, serving = read_weights(fine_tuned[0])
    apply, folded_vars = predict.folded_step(model, variables, serving["image_size"])
    assert set(folded_vars) == {"params", "prepared"}  # the kernels' weight transforms, prepared once too
    assert not any("bn" in path for path in traverse_util.flatten_dict(folded_vars))
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    assert "rsqrt" not in apply.lower(folded_vars, x).as_text()
    assert "rsqrt" in jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).as_text()
    assert rel(apply(folded_vars, x), flax_logits(model, variables, x)) < 1e-5
