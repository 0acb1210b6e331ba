"""`python -m experiments.finetune` end to end with small images: a generated image folder learned to over 90%,
what the job writes, resume after a SIGTERM bit for bit, a linear probe warm-started from a stand-in .pth with
another class count, evaluate-only against torchvision's own evaluation (an ImageNet synset folder) and on TFDS's
mock imagenet2012, and one clear line for each bad input. Runs call `main(argv)` in-process and share one
persistent compilation cache, so each distinct step compiles once for the module."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import job_runs
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
import torchvision
from PIL import Image, ImageDraw

from convert import torchvision_to_flax
from experiments import finetune
from jax_googlenet import data
from jax_googlenet.data import folder, transforms

ROOT = Path(__file__).resolve().parents[1]

# 16 px crops (18 px resize), batch 12: 60 training images give 5 steps an epoch. Every training run here uses
# these flags, so its train and eval steps are one compile (lr, epochs and batch are constants of the step).
TINY = ["--image-size", "16", "--batch-size", "12", "--epochs", "8", "--lr", "0.01", "--warmup-epochs", "0.5",
        "--workers", "0"]
LEVELS = {"dark": 45, "mid": 128, "bright": 210}  # classes a network tells apart after any crop: brightness


def write_images(root, per_class, seed):
    """Grey PNGs and RGB JPEGs of varied sizes, noise around each class's brightness."""
    rng = np.random.default_rng(seed)
    for name, level in LEVELS.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            h, w = rng.integers(24, 48, 2)
            x = np.clip(rng.normal(level, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            if k % 3 == 0:
                Image.fromarray(x[..., 0]).save(root / name / f"{k}.png")
            else:
                Image.fromarray(x).save(root / name / f"{k}.jpg", quality=90)


SHAPES = {"square": (200, 60, 50), "circle": (60, 190, 70), "triangle": (50, 80, 200)}  # reddish, greenish, bluish


def write_shapes(root, per_class, side, seed):
    """One coloured shape per image on a grey background: a class's colour jittered, its size and place random."""
    rng = np.random.default_rng(seed)
    for name, color in SHAPES.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            image = Image.new("RGB", (side, side), (int(rng.integers(90, 170)),) * 3)
            r = rng.uniform(0.3, 0.45) * side
            cx, cy = rng.uniform(r, side - r, 2)
            fill = tuple(int(np.clip(c + rng.normal(0, 25), 0, 255)) for c in color)
            draw = ImageDraw.Draw(image)
            if name == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif name == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            image.save(root / name / f"{k}.png")


@pytest.fixture(scope="module")
def env(tmp_path_factory, compile_cache):
    """The image folder (train/ 20 per class plus one truncated file, val/ 8 per class); every run here shares
    one compilation cache."""
    root = tmp_path_factory.mktemp("finetune_cli")
    write_images(root / "data" / "train", 20, seed=0)
    write_images(root / "data" / "val", 8, seed=1)
    (root / "data" / "train" / "mid" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return {"root": root, "data": f"folder:{root / 'data'}"}


def run_main(argv, capsys):
    return job_runs.run_main(finetune.main, argv, capsys)


@pytest.fixture(scope="module")
def learned(env):
    """A whole run from scratch on the folder: its workdir, stdout and stderr."""
    workdir = env["root"] / "learned"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert finetune.main(["--data", env["data"], "--workdir", str(workdir), *TINY]) == 0
    return workdir, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_a_generated_image_folder_is_learned_to_over_90_percent(learned):
    workdir, out, _ = learned
    last = out.strip().splitlines()[-1]
    assert last.startswith("test_accuracy=") and float(last.split("=")[1]) >= 0.9, out
    assert "from scratch" in out and "RandomResizedCrop(16, scale=(0.08, 1)) + horizontal flip p=0.5" in out
    assert "Resize(18) + CenterCrop(16)" in out


@pytest.mark.slow
def test_a_short_run_from_scratch_is_evaluated_right_with_recalibrated_batch_norm_and_wrong_without(env, capsys):
    """Shapes by colour (60 training / 45 held-out images, TINY's 8 epochs of 5 steps, so the steps are the
    module's one compile): the running statistics lag the weights, so halfway through the network with them
    calls every held-out image one class (0.33 measured from the first epoch to the fourth; it catches up only
    at the end, 1.0 at the eighth); with BatchNorm's statistics recomputed over the training images before each
    evaluation (the default) it is at 1.0 from the fourth epoch. The training and the checkpoints (running
    statistics) are the same in both runs; model/ holds the evaluated statistics."""
    root = env["root"] / "shapes"
    write_shapes(root / "train", 20, 40, seed=0)
    write_shapes(root / "val", 15, 40, seed=1)
    results = {}
    for name, extra in (("default", []), ("off", ["--bn-recalibrate", "0"])):
        workdir = env["root"] / f"shapes-{name}"
        rc, out, err = run_main(["--data", f"folder:{root}", *TINY, "--workdir", str(workdir), *extra], capsys)
        assert rc == 0, err
        results[name] = workdir, out, [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    (workdir, out, records), (_, out_off, records_off) = results["default"], results["off"]
    assert out.count("recalibrated BatchNorm over 60 images") == 8 and "recalibrated" not in out_off
    halfway = len(records) // 2 - 1
    assert records[halfway]["test_accuracy"] >= 0.9 > records_off[halfway]["test_accuracy"], (out, out_off)
    assert records[-1]["test_accuracy"] >= 0.9, out
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in records_off]
    (_, state), (_, state_off) = (job_runs.latest_checkpoint(results[k][0]) for k in ("default", "off"))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_off), strict=True):  # running statistics kept
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rc, evaluated, _ = run_main(["--evaluate", str(workdir / "model"), "--data", f"folder:{root}", "--image-size",
                                 "16", "--batch-size", "12", "--workers", "0"], capsys)
    assert rc == 0 and evaluated.strip().splitlines()[-1].startswith(f"top1={records[-1]['test_accuracy']:.4f}")


@pytest.mark.slow
def test_the_run_writes_metrics_curves_per_class_accuracy_confusion_checkpoints_and_the_model(learned):
    workdir, out, _ = learned
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 9)) and records[-1]["test_count"] == 24
    assert all(r["test_top5_accuracy"] == 1.0 for r in records)  # 3 classes: always in the top 5
    evaluation = json.loads((workdir / "evaluation.json").read_text())
    assert evaluation["top1"] == records[-1]["test_accuracy"] and evaluation["count"] == 24
    assert [c["class"] for c in evaluation["per_class"]] == ["bright", "dark", "mid"]
    assert [c["count"] for c in evaluation["per_class"]] == [8, 8, 8]
    confusion = np.array(evaluation["confusion"])
    assert confusion.sum() == 24 and np.trace(confusion) / 24 == evaluation["top1"]
    for name in ("curves.png", "confusion.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((workdir / "config.json").read_text())
    assert config["classes"] == ["bright", "dark", "mid"] and config["transform_input"] is False
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [30, 35, 40]
    assert (workdir / "model" / "config").is_dir() and f"wrote {workdir / 'model'}" in out
    from jax_googlenet.checkpoint import load_serving

    serving = load_serving(workdir / "model")  # the run's crops and class names, not ImageNet's defaults
    assert (serving["image_size"], serving["resize_size"]) == (16, 18)
    assert serving["class_names"] == ["bright", "dark", "mid"]


@pytest.mark.slow
def test_an_unreadable_image_is_reported_once_by_path_and_skipped(learned, env):
    _, _, err = learned
    broken = env["root"] / "data" / "train" / "mid" / "broken.jpg"
    assert err.count("cannot read the image") == 1  # eight epochs, one report
    assert f"warning: {broken}: cannot read the image" in err and "skipped" in err


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_uninterrupted_parameters_bit_for_bit(env, learned, capsys, monkeypatch):
    reference_dir, _, _ = learned
    workdir = env["root"] / "killed"
    serve = finetune.EpochsOfOneStream.__call__

    def kill_in_epoch_3(self, epoch, start):
        batches = serve(self, epoch, start)
        for i, batch in enumerate(batches):
            if epoch == 2 and i == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes this step, saves and exits
            yield batch

    monkeypatch.setattr(finetune.EpochsOfOneStream, "__call__", kill_in_epoch_3)
    with pytest.raises(SystemExit) as stopped:
        finetune.main(["--data", env["data"], "--workdir", str(workdir), *TINY])
    monkeypatch.undo()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by signal 15 at step 12" in capsys.readouterr().err

    rc, out, _ = run_main(["--resume", "--workdir", str(workdir), "--workers", "0"], capsys)
    assert rc == 0 and "resumed from step 12 (epoch 3, step 2 of 5)" in out
    step, resumed = job_runs.latest_checkpoint(workdir)
    ref_step, reference = job_runs.latest_checkpoint(reference_dir)
    assert step == ref_step == 40
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_sigint_to_the_process_group_with_data_workers_saves_and_resume_is_bit_for_bit(env, learned, capsys):
    """Ctrl-C in a terminal signals the whole process group: the job and its two grain worker processes. The
    workers leave the stop to the job, which saves at the step reached and exits 130."""
    reference_dir, _, _ = learned
    workdir = env["root"] / "interrupted"
    cmd = [sys.executable, "-m", "experiments.finetune", "--data", env["data"], "--workdir", str(workdir), *TINY,
           "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a shell's job
    # the first step's progress line: the workers are serving batches; stop it there
    out, err = job_runs.stopped_at_line(proc, "epoch 1/8: 12/60 img", lambda: os.killpg(proc.pid, signal.SIGINT))
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "stopped by signal 2" in err and "Traceback" not in err and "terminated" not in err, err[-3000:]
    stopped_at, _ = job_runs.latest_checkpoint(workdir)
    assert 1 <= stopped_at < 40

    rc, out, err = run_main(["--resume", "--workdir", str(workdir), "--workers", "0"], capsys)
    assert rc == 0 and f"resumed from step {stopped_at}" in out, err
    step, resumed = job_runs.latest_checkpoint(workdir)
    ref_step, reference = job_runs.latest_checkpoint(reference_dir)
    assert step == ref_step == 40
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_linear_probe_from_a_pth_of_another_class_count_trains_fc_alone(env, pth_file, torchvision_state_dict,
                                                                        capsys):
    workdir = env["root"] / "probe"
    rc, out, _ = run_main(["--data", env["data"], "--workdir", str(workdir), "--init", str(pth_file),
                           "--freeze-backbone", *TINY, "--epochs", "2"], capsys)
    assert rc == 0
    assert "transform_input=True" in out and "linear probe" in out
    assert "kept fresh: params/fc/kernel (fresh as requested)" in out and "kept fresh: params/aux1/fc2/kernel" in out
    assert "copied 299 of 305 tensors" in out  # all but the three heads' kernels and biases
    _, state = job_runs.latest_checkpoint(workdir)
    pretrained = torchvision_to_flax(torchvision_state_dict)
    for collection in ("params", "batch_stats"):
        trained, source = state[collection], pretrained[collection]
        for name in source:
            if name in ("fc", "aux1", "aux2"):
                continue
            for a, b in zip(jax.tree.leaves(trained[name]), jax.tree.leaves(source[name]), strict=True):
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (collection, name)
    assert not np.array_equal(state["params"]["fc"]["bias"], np.zeros(3))


@pytest.mark.slow
def test_evaluate_only_prints_what_the_run_measured(env, learned, capsys):
    workdir, _, _ = learned
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    rc, out, _ = run_main(["--evaluate", str(workdir / "model"), "--data", env["data"], "--image-size", "16",
                           "--batch-size", "12", "--workers", "0"], capsys)
    assert rc == 0 and "evaluating on" in out
    assert out.strip().splitlines()[-1] == (f"top1={record['test_accuracy']:.4f} "
                                            f"top5={record['test_top5_accuracy']:.4f} (24 images)")


@pytest.fixture(scope="module")
def imagenet_standin(env):
    """A 1000-class torchvision GoogLeNet whose predictions depend on the image (torchvision's init, BatchNorm
    statistics averaged over random smooth 32 px images; the conftest stand-in's randomised statistics swamp
    its small initial weights, so it predicts one class for everything), saved as a .pth; and a stand-in
    ImageNet validation folder: 1,000 synset folders of one image each."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average
            m.reset_running_stats()
    noise = torch.rand(64, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 4 - 2
    with torch.no_grad():
        model.train()(torch.nn.functional.interpolate(noise, size=(32, 32), mode="bilinear"))
    pth = env["root"] / "imagenet-standin.pth"
    torch.save(model.state_dict(), pth)
    root = env["root"] / "imagenet" / "val"
    rng = np.random.default_rng(0)
    for k in range(1000):
        (root / f"n{k:08d}").mkdir(parents=True)
        small = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)  # smooth images of many colours
        Image.fromarray(small).resize((50, 40), Image.BILINEAR).save(root / f"n{k:08d}" / f"{k}.png")
    return pth, model.state_dict(), root


@pytest.mark.slow
def test_evaluate_only_on_an_imagenet_synset_folder_is_torchvisions_evaluation(env, imagenet_standin, capsys):
    """Image by image, our evaluation of a .pth predicts what torchvision's model with those weights predicts
    under its own ImageFolder and its weights' transforms (Resize 37, CenterCrop 32 here), and the top-1 / top-5
    printed are torchvision's."""
    pth, state_dict, root = imagenet_standin
    out_dir = env["root"] / "imagenet_eval"
    rc, out, _ = run_main(["--evaluate", str(pth), "--data", f"folder:{root.parent}", "--image-size", "32",
                           "--batch-size", "50", "--workers", "0", "--workdir", str(out_dir)], capsys)
    assert rc == 0 and "1,000 images, 1000 classes" in out
    # One image per class: row k of the confusion matrix holds image k's prediction.
    ours = np.array(json.loads((out_dir / "evaluation.json").read_text())["confusion"]).argmax(axis=1)

    weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("aux")})
    folder = torchvision.datasets.ImageFolder(root, transform=weights.transforms(crop_size=32, resize_size=37))
    with torch.no_grad():
        logits = torch.cat([model.eval()(x) for x, _ in torch.utils.data.DataLoader(folder, batch_size=200)])
    logits, labels = logits.numpy(), np.array(folder.targets)
    assert len(set(ours.tolist())) > 50  # the predictions vary from image to image
    # float32 logits that agree to ~1e-6 can only part on a near tie: none in these 1,000 (measured)
    np.testing.assert_array_equal(ours, logits.argmax(axis=1))
    top1 = np.mean(logits.argmax(axis=1) == labels)
    top5 = np.mean((np.argsort(-logits, axis=1)[:, :5] == labels[:, None]).any(axis=1))
    assert out.strip().splitlines()[-1] == f"top1={top1:.4f} top5={top5:.4f} (1,000 images)"


@pytest.mark.slow
def test_evaluate_only_reads_tfds_imagenet2012(imagenet_standin, capsys):
    pth, _, _ = imagenet_standin
    with tfds.testing.mock_data(num_examples=20):
        rc, out, _ = run_main(["--evaluate", str(pth), "--data", "tfds:imagenet2012", "--image-size", "32",
                               "--batch-size", "50", "--workers", "0"], capsys)
    assert rc == 0 and "tfds imagenet2012 validation (20 images, 1000 classes)" in out
    assert out.strip().splitlines()[-1].endswith("(20 images)")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, env, pth_file):
    """What the bad-input cases name: an empty folder, a one-class folder, a text file as weights."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "one" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "one" / "only" / "a.png")
    (root / "weights.pth").write_text("not a state dict")
    return {"empty": root / "empty", "one": root / "one", "text": root / "weights.pth", "data": env["data"],
            "pth": pth_file}


@pytest.mark.parametrize("argv, message", [
    ([], "--data is required: folder:DIR or tfds:NAME"),
    (["--data", "folder:/nonexistent/photos"], "--data folder:/nonexistent/photos: no such directory"),
    (["--data", "photos"], "choose one of folder:DIR, tfds:NAME"),
    (["--data", "folder:{empty}"], "holds no class folders; expected torchvision's ImageFolder layout"),
    (["--data", "folder:{one}"], "has 1 class (only); a classifier needs at least 2"),
    (["--data", "{data}", "--image-size", "8"], "--image-size 8: torchvision's GoogLeNet accepts 15 and up"),
    (["--data", "{data}", "--resize-size", "12"], "--resize-size 12 is smaller than --image-size 16"),
    (["--data", "{data}", "--batch-size", "96"], "--batch-size 96 is larger than the 61 training images"),
    (["--data", "{data}", "--label-smoothing", "1.5"], "--label-smoothing 1.5: choose a value in [0, 1)"),
    (["--data", "{data}", "--init", "/nonexistent.pth"], "--init /nonexistent.pth: no such file or directory"),
    (["--data", "{data}", "--init", "{text}"], "--init {text}: "),
    (["--data", "{data}", "--evaluate", "{pth}"], "a 1000-class model, but --data folder:"),
    (["--data", "tfds:cifar10", "--data-dir", "{empty}"], "is not prepared as array_record"),
    (["--data", "{data}", "--bad-images", "ignore"], "argument --bad-images: invalid choice: 'ignore'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad, capsys, argv, message, tmp_path):
    workdir = tmp_path / "never"
    argv = ["--workdir", str(workdir), *TINY[:4]] + [a.format(**bad) for a in argv]  # the case's flags last
    rc, _, err = run_main(argv, capsys)
    assert rc == 2 and message.format(**bad) in err, err
    assert len(err.strip().splitlines()) == 1 and not workdir.exists()


@pytest.mark.slow
def test_resume_on_a_dataset_with_other_classes_is_refused_before_writing(learned, capsys, tmp_path):
    workdir, _, _ = learned
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / split / name / "0.png")
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    rc, _, err = run_main(["--resume", "--workdir", str(workdir), "--data", f"folder:{tmp_path}"], capsys)
    assert rc == 2 and "was trained on 3 classes (bright, dark, mid ...)" in err and "has 2" in err, err
    rc, _, err = run_main(["--resume", "--workdir", str(workdir), "--lr", "0.1"], capsys)
    assert rc == 2 and "was trained with --lr 0.01, not 0.1" in err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        finetune.main(["--help"])
    explained = job_runs.explained_flags(capsys.readouterr().out)
    assert e.value.code == 0
    assert sorted(explained) == sorted([
        "--help", "--data", "--data-dir", "--val-fraction", "--val-split", "--init", "--freeze-backbone",
        "--backbone-lr-scale", "--epochs", "--batch-size", "--lr", "--momentum", "--weight-decay", "--warmup-epochs",
        "--label-smoothing", "--image-size", "--resize-size", "--crop-scale", "--hflip", "--no-aux", "--bad-images",
        "--workers", "--evaluate", "--seed", "--workdir", "--resume", "--devices", "--coordinator",
        "--num-processes", "--process-id", "--dtype", "--no-compile-cache", "--system-malloc", "--bn-recalibrate",
        "--max-pixels",
        "--max-resized-pixels"])
    assert [flag for flag, text in explained.items() if not text] == []


def test_the_image_budgets_are_flags_given_to_the_data_layer_and_its_refusal_names_them(env, monkeypatch):
    """--max-pixels reaches the folder source (an image over it is unreadable, the reason naming the flag) and
    --max-resized-pixels the evaluation transform; by default both are the data layer's."""
    defaults = finetune.parse_args(["--data", env["data"]])
    assert (defaults.max_pixels, defaults.max_resized_pixels) == (folder.MAX_PIXELS, transforms.MAX_RESIZED_PIXELS)
    args = finetune.parse_args(["--data", env["data"], "--max-pixels", "600", "--max-resized-pixels", "700"])
    cfg = finetune.make_config(args, None)
    dataset = finetune.load_data(cfg, max_pixels=args.max_pixels)
    with pytest.raises(data.DataError, match="--max-pixels"):  # the images are 24 to 47 pixels a side
        for i in range(len(dataset.train)):
            dataset.train.read(i)
    seen = []
    real = data.eval_transform
    monkeypatch.setattr(data, "eval_transform", lambda record, **kw: seen.append(kw) or real(record, **kw))
    cfg["classes"] = dataset.classes
    _, eval_batches = finetune.make_batches(cfg, dataset, 1, 0, max_resized_pixels=args.max_resized_pixels)
    next(iter(eval_batches()))
    assert seen and all(kw["max_resized_pixels"] == 700 for kw in seen)
