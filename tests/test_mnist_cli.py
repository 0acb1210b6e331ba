"""`python -m experiments.mnist` end to end with tiny settings: what it writes, checkpoint/resume equivalence
after a real SIGTERM, and one clear line for each bad input. Runs call `main(argv)` in-process where they can;
all share one persistent compilation cache so the train step compiles once for the module."""

import concurrent.futures
import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import job_runs
import numpy as np
import pytest

from experiments import mnist, rundir
from experiments.cli import TrainingError
from jax_googlenet import data

ROOT = Path(__file__).resolve().parents[1]
# torchvision variant at 16 px, batch 8, 48 real digits: 6 steps an epoch.
TINY = ["--variant", "torchvision", "--image-size", "16", "--batch-size", "8", "--epochs", "3", "--lr", "0.02"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, compile_cache):
    """Real digits from the shipped sample as IDX files, and a compilation cache shared by every run here."""
    root = tmp_path_factory.mktemp("mnist_cli")
    spec = job_runs.write_sample_idx(root / "idx")
    return {"root": root, "data": spec, "cache": compile_cache}


def run_main(argv, capsys):
    return job_runs.run_main(mnist.main, argv, capsys)


def metrics(workdir):
    """metrics.jsonl's records without their timings, the fields a rerun reproduces exactly."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(env):
    """A whole tiny run, in-process: its workdir and what it printed."""
    workdir = env["root"] / "uninterrupted"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert mnist.main(["--data", env["data"], "--workdir", str(workdir), *TINY]) == 0
    return workdir, out.getvalue()


@pytest.mark.slow
def test_cli_writes_metrics_plot_checkpoints_and_reports_accuracy_last(uninterrupted):
    workdir, out = uninterrupted
    assert "preset: quick" in out and "mesh data=1" in out and "dataset: idx" in out
    assert "host memory: freed blocks kept for reuse" in out
    assert "XLA:CPU's default dot and convolution kernels (YNNPACK's in float32 below 64 pixels)" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("test_accuracy=") and len(last) == len("test_accuracy=0.xxxx")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["test_count"] == 20  # 8 + 8 + 4 padded
    assert float(last.split("=")[1]) == pytest.approx(records[-1]["test_accuracy"], abs=5e-5)
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((workdir / "config.json").read_text())["variant"] == "torchvision"
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 12, 18]  # one per epoch (the last MAX_TO_KEEP = 3 kept)


@pytest.mark.slow
def test_the_run_ends_with_a_model_directory_whose_serving_metadata_predict_reads(uninterrupted, tmp_path, capsys):
    """model/ holds the trained network with its image size, MNIST's normalisation and the digits as class names;
    predict classifies a digit with it."""
    from PIL import Image

    from experiments import predict
    from jax_googlenet.checkpoint import load_model, load_serving

    workdir, out = uninterrupted
    model, _ = load_model(workdir / "model")
    assert (model.variant.name, model.num_classes, model.in_channels) == ("torchvision", 10, 1)
    serving = load_serving(workdir / "model")
    assert serving["image_size"] == serving["resize_size"] == 16  # TINY's, not the 1-channel default of 32
    assert serving["class_names"] == [str(d) for d in range(10)]
    assert serving["mean"] == [pytest.approx(data.MEAN)] and serving["std"] == [pytest.approx(data.STD)]
    digit = tmp_path / "digit.png"
    Image.fromarray(data.load_sample().test.images[0, ..., 0]).save(digit)
    capsys.readouterr()
    assert predict.main(["--weights", str(workdir / "model"), str(digit), "--json", "--top-k", "10"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert sorted(t["class"] for t in result["top_k"]) == [str(d) for d in range(10)]


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_uninterrupted_parameters_bit_for_bit(env, uninterrupted, capsys):
    reference_dir, _ = uninterrupted
    workdir = env["root"] / "killed"
    cmd = [sys.executable, "-m", "experiments.mnist", "--data", env["data"], "--workdir", str(workdir), *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # its second step's progress line (one per step past a tenth): kill it there
    out, err = job_runs.stopped_at_line(proc, "epoch 1/3: 16/48 img (33%), loss ",
                                        lambda: proc.send_signal(signal.SIGTERM))
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal 15" in err and "Traceback" not in err
    assert "epoch 1/3: 8/48 img (17%), loss " in err and "\r" not in err  # no redrawn bar
    killed_at, _ = job_runs.latest_checkpoint(workdir)
    assert 2 <= killed_at < 18

    rc, out, _ = run_main(["--resume", "--workdir", str(workdir)], capsys)
    assert rc == 0 and f"resumed from step {killed_at}" in out
    step, resumed = job_runs.latest_checkpoint(workdir)
    ref_step, reference = job_runs.latest_checkpoint(reference_dir)
    assert step == ref_step == 18
    flat_resumed, flat_reference = jax.tree.leaves(resumed), jax.tree.leaves(reference)
    assert len(flat_resumed) == len(flat_reference)
    for a, b in zip(flat_resumed, flat_reference):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit, not approximately
    # the interrupted epoch's train metrics count its steps from before the signal too (kept in the checkpoint)
    assert [r["epoch"] for r in metrics(workdir)] == [1, 2, 3] and metrics(workdir) == metrics(reference_dir)


@pytest.mark.slow
def test_a_signal_at_an_epochs_last_step_writes_its_results_then_exits(env, uninterrupted, capsys, monkeypatch):
    """SIGTERM while the first epoch's last batch trains: that epoch is evaluated, written and saved before the
    exit (status 143), so the resumed run starts the second epoch and writes the uninterrupted run's history."""
    reference_dir, _ = uninterrupted
    workdir = env["root"] / "epoch_end"
    train_batches = data.train_batches

    def signal_after_the_first_epoch(source, *, epoch, **kwargs):
        yield from train_batches(source, epoch=epoch, **kwargs)
        if epoch == 0:  # the loop has dispatched the epoch's last step and asks for another batch
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(data, "train_batches", signal_after_the_first_epoch)
    with pytest.raises(SystemExit, match="^143$"):
        mnist.main(["--data", env["data"], "--workdir", str(workdir), *TINY])
    out, err = capsys.readouterr()
    assert "epoch 1: train_loss=" in out and "stopped by signal 15 at step 6: saved checkpoint 6" in err
    monkeypatch.undo()

    rc, out, _ = run_main(["--resume", "--workdir", str(workdir)], capsys)
    assert rc == 0 and "resumed from step 6 (epoch 2, step 0 of 6)" in out
    assert metrics(workdir) == metrics(reference_dir)


@pytest.mark.slow
def test_a_data_failure_after_the_stop_signal_still_saves(env, uninterrupted, capsys, monkeypatch):
    """Data workers that got the signal too end the batches with an error (grain's "Worker process was
    terminated"): after a stop signal that is the data stopping with the run, so the job saves the step it reached
    and exits 143, and the resumed run writes the uninterrupted run's history."""
    reference_dir, _ = uninterrupted
    workdir = env["root"] / "data_stopped"
    train_batches = data.train_batches

    def workers_terminated_with_the_job(source, *, epoch, **kwargs):
        for i, batch in enumerate(train_batches(source, epoch=epoch, **kwargs)):
            if epoch == 0 and i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError("Worker process was terminated")
            yield batch

    monkeypatch.setattr(data, "train_batches", workers_terminated_with_the_job)
    with pytest.raises(SystemExit, match="^143$"):
        mnist.main(["--data", env["data"], "--workdir", str(workdir), *TINY])
    _, err = capsys.readouterr()
    assert "stopped by signal 15 at step 2: saved checkpoint 2" in err and "Traceback" not in err, err
    monkeypatch.undo()

    rc, out, _ = run_main(["--resume", "--workdir", str(workdir)], capsys)
    assert rc == 0 and "resumed from step 2 (epoch 1, step 2 of 6)" in out
    assert metrics(workdir) == metrics(reference_dir)


@pytest.mark.slow
def test_checkpoint_written_on_two_devices_resumes_on_one(env, capsys):
    """Stopped within its first epoch on 2 simulated devices, the run continues on this process's one device."""
    workdir = env["root"] / "two_devices"
    argv = ["--data", env["data"], "--workdir", str(workdir), "--devices", "2", *TINY]
    # Its 2-device steps are compiled for this run alone, so with most optimisations off (LLVM at level 0 alone
    # halved the train step's compile, measured) and the elemental emitters; only the checkpoint it leaves matters.
    two = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {job_runs.ELEMENTAL_EMITTERS}",
           "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    proc = subprocess.run([sys.executable, "-c", job_runs.mnist_signalling_itself("SIGTERM"), *argv], cwd=ROOT,
                          env=two, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM and "mesh data=2" in proc.stdout, proc.stderr[-3000:]
    killed_at = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert 1 <= killed_at < 6 and f"stopped by signal 15 at step {killed_at}" in proc.stderr, proc.stderr[-3000:]

    assert jax.device_count() == 1
    rc, out, _ = run_main(["--resume", "--workdir", str(workdir)], capsys)
    assert rc == 0 and f"resumed from step {killed_at}" in out and "mesh data=1" in out
    step, resumed = job_runs.latest_checkpoint(workdir)
    assert step == 18 and out.strip().splitlines()[-1].startswith("test_accuracy=")
    # Only finiteness is asserted: 2 devices sum the batch in another order, and over the 12 steps that follow,
    # with BatchNorm on batches of 8, that rounding grows to differences of order 0.1 (measured); one step's
    # equivalence is tests/test_distributed.py's.
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(resumed))


@pytest.mark.parametrize("argv, message", [
    (["--variant", "inception"], "argument --variant: invalid choice: 'inception'"),
    (["--dtype", "float16"], "argument --dtype: invalid choice"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--image-size", "8"], "--image-size 8: the torchvision variant with aux heads accepts"),
    (["--devices", "2"], "--devices 2: this run has 1 device(s)"),
    (["--resume"], "holds no run (no config.json)"),
    (["--init", "/nonexistent/googlenet.pth"], "--init /nonexistent/googlenet.pth: no such file"),
    (["--data", "idx:/nonexistent/mnist"], "--data idx:/nonexistent/mnist: no such directory"),
    (["--data", "mnist.npz"], "choose one of auto, tfds, sample, idx:DIR"),
    (["--preset", "seed"], "error: argument --preset: the preset 'seed' is now called 'writeup'"),
    (["--variant", "seed"], "error: argument --variant: the variant 'seed' is now called 'writeup'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(env, capsys, argv, message):
    workdir = env["root"] / "never"
    base = ["--data", env["data"], "--workdir", str(workdir), *TINY]
    rc, _, err = run_main(base + argv, capsys)
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not workdir.exists()


@pytest.mark.slow
def test_resume_reads_a_run_written_before_the_rename_to_writeup(env, capsys, unoptimised_compile):
    """A run directory from before the write-up's preset, variant and loss mode were renamed from "seed" keeps
    "seed" in its config.json: --resume reads it under the new names, says so in one line, and restores it."""
    workdir = env["root"] / "before_rename"
    cfg = {"preset": "writeup", **mnist.PRESETS["writeup"], "image_size": 189, "batch_size": 8, "epochs": 1,
           "seed": 0, "dtype": "float32", "data": env["data"], "data_dir": None}  # 48 digits: 6 steps, 1 epoch
    abstract = jax.eval_shape(lambda: mnist.create_state(cfg, jax.random.key(0), 6, init=None, lead=False))
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract).replace(step=np.int32(6))
    record = {"epoch": 1, "step": 6, "train_loss": 2.3, "train_accuracy": 0.1, "test_loss": 2.3,
              "test_accuracy": 0.1, "test_count": 20, "epoch_seconds": 9.0, "images_per_second": 5.3}
    checkpoints = rundir.Checkpoints(workdir)  # the job's own layout: state and metrics history
    checkpoints.save(6, state, [record])
    checkpoints.close()
    old = {**cfg, "preset": "seed", "variant": "seed", "loss_mode": "seed"}
    (workdir / "config.json").write_text(json.dumps(old, indent=1))

    rc, out, err = run_main(["--resume", "--workdir", str(workdir), "--variant", "writeup"], capsys)
    assert rc == 0, err
    assert [line for line in out.splitlines() if "earlier names" in line] == [
        f"--resume: {workdir} was written under earlier names, read as today's: preset 'seed' -> 'writeup', "
        f"variant 'seed' -> 'writeup', loss_mode 'seed' -> 'writeup'"]
    assert "model: writeup variant" in out and "resumed from step 6" in out
    assert out.strip().splitlines()[-1] == "test_accuracy=0.1000"


def test_corrupted_idx_through_the_cli(env, capsys, tmp_path):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes((env["root"] / "idx" / f"{name}.gz").read_bytes())
        (tmp_path / name).rename(tmp_path / f"{name}.gz")
    raw = (tmp_path / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    rc, _, err = run_main(["--data", f"idx:{tmp_path}", "--workdir", str(tmp_path / "w"), *TINY], capsys)
    assert rc == 2 and "train-images-idx3-ubyte.gz: cannot read" in err and not (tmp_path / "w").exists()


@pytest.fixture
def started(env, tmp_path, capsys):
    """A run directory as the job leaves it before its first checkpoint: config.json alone (what --resume and a
    new run's check read), without the minutes of a real run."""
    args = mnist.parse_args(["--data", env["data"], "--workdir", str(tmp_path), *TINY])
    rundir.write_atomic(tmp_path / "config.json", json.dumps(mnist.make_config(args, None), indent=1).encode())
    capsys.readouterr()  # make_config's preset line
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["--variant", "writeup"], "was trained with --variant torchvision, not writeup"),
    (["--image-size", "24"], "was trained with --image-size 16, not 24"),
])
def test_resume_with_another_variant_or_shape_is_refused(started, capsys, argv, message):
    rc, _, err = run_main(["--resume", "--workdir", str(started), *argv], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in started.iterdir()] == ["config.json"]  # refused before anything is written


def test_a_used_workdir_needs_resume(env, started, capsys):
    rc, _, err = run_main(["--data", env["data"], "--workdir", str(started), *TINY], capsys)
    assert rc == 2 and "already holds a run; add --resume" in err


def test_a_second_run_on_a_held_workdir_is_one_line_naming_the_holder(env, tmp_path, capsys):
    """A running job holds an exclusive lock on run.lock in its directory, its pid inside (the kernel releases
    it when the holder dies); a second run there is refused before it reads any data, and changes nothing."""
    with open(tmp_path / "run.lock", "w") as holder:  # a run in progress
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write(f"{os.getpid()}\n")
        holder.flush()
        rc, out, err = run_main(["--data", env["data"], "--workdir", str(tmp_path), *TINY], capsys)
        assert (tmp_path / "run.lock").read_text() == f"{os.getpid()}\n"
    assert rc == 2 and err.strip() == (f"error: --workdir {tmp_path} is in use by another run (pid {os.getpid()}); "
                                       f"wait for it to end or choose another --workdir")
    assert "dataset:" not in out and sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]


def test_default_workdirs_are_unique_to_the_process():
    """Two runs started in the same second without --workdir get directories of their own."""
    name = rundir.new_workdir("mnist-quick").name
    assert name.startswith("mnist-quick-") and name.endswith(f"-{os.getpid()}")


def test_a_workdir_with_checkpoints_but_no_config_is_refused_and_never_pruned(env, tmp_path, capsys):
    for step in (6, 12, 18, 24):  # more than the run keeps: a new run's retention would delete the oldest
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
        (tmp_path / "checkpoints" / str(step) / "state").write_text(f"state {step}")
    rc, _, err = run_main(["--data", env["data"], "--workdir", str(tmp_path), *TINY], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"--workdir {tmp_path} holds checkpoints but no config.json" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["12", "18", "24", "6"]


@pytest.mark.parametrize("text, message", [
    ("{not json", "config.json is not JSON"),
    ("[1, 2]", "config.json holds a list, not a run's config"),
    ('{"epochs": 3}', "config.json lacks"),
])
def test_resume_on_a_broken_config_is_one_line(tmp_path, capsys, text, message):
    (tmp_path / "config.json").write_text(text)
    rc, _, err = run_main(["--resume", "--workdir", str(tmp_path)], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_resume_on_data_of_another_size_is_refused_naming_both(env, started, capsys):
    """config.json keeps the dataset's size: the steps per epoch and the learning-rate schedule follow it."""
    cfg = json.loads((started / "config.json").read_text())
    (started / "config.json").write_text(json.dumps({**cfg, "train_size": 40, "test_size": 20}))
    rc, _, err = run_main(["--resume", "--workdir", str(started)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert (f"--resume: the run in {started} was trained on 40 training and 20 test images; --data {env['data']} "
            f"has 48 and 20") in err


@pytest.mark.slow
def test_the_config_keeps_the_datasets_size(uninterrupted):
    workdir, _ = uninterrupted
    cfg = json.loads((workdir / "config.json").read_text())
    assert (cfg["train_size"], cfg["test_size"]) == (48, 20)


def test_init_given_a_text_file_is_one_line_before_any_data_is_read(env, tmp_path, capsys):
    (tmp_path / "weights.pth").write_text("not a state dict")
    rc, out, err = run_main(["--data", env["data"], "--workdir", str(tmp_path / "w"), *TINY,
                             "--init", str(tmp_path / "weights.pth")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"--init {tmp_path / 'weights.pth'}: not a PyTorch state dict" in err
    assert "dataset:" not in out and not (tmp_path / "w").exists()


# Runs the job with the disk full from its second checkpoint on: every file it writes is capped at 1 KiB
# (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the writes fail with EFBIG) once a complete checkpoint exists.
DISK_FULL_AFTER_FIRST_CHECKPOINT = """
import resource, sys
from experiments import cli, mnist, rundir
save = rundir.Checkpoints.save
def save_on_a_full_disk(self, *args, **kwargs):
    if self.latest_step() is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    return save(self, *args, **kwargs)
rundir.Checkpoints.save = save_on_a_full_disk
cli.exit_process(mnist.main(sys.argv[1:]))  # as `python -m experiments.mnist` ends
"""


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_exit_1_and_the_next_start_continues(env, capsys):
    workdir = env["root"] / "full"
    argv = ["--data", env["data"], "--workdir", str(workdir), *TINY]
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_AFTER_FIRST_CHECKPOINT, *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("error") == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1].startswith(
        f"error: saving checkpoint 12 in {workdir} failed (File too large); the last complete checkpoint is 6")
    assert [r["epoch"] for r in metrics(workdir)] == [1]  # metrics.jsonl as the last complete epoch left it
    assert job_runs.latest_checkpoint(workdir)[0] == 6

    rc, out, err = run_main(["--resume", "--workdir", str(workdir)], capsys)
    assert rc == 0 and "resumed from step 6" in out, err
    assert [p.name for p in workdir.rglob("*") if "tmp" in p.name] == []  # the failed save's leftovers removed
    assert [r["epoch"] for r in metrics(workdir)] == [1, 2, 3]


def test_an_atomic_write_syncs_its_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """`rundir.write_atomic` (config.json, metrics.jsonl, the plots): the temporary file reaches the disk before it
    is renamed over the target, and the directory after, so a crash loses neither the data nor the rename."""
    synced, fsync = [], os.fsync

    def recorded(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    target = tmp_path / "metrics.jsonl"
    rundir.write_atomic(target, b"{}\n")
    assert synced == [str(tmp_path / ".metrics.jsonl.tmp"), str(tmp_path)]
    assert target.read_bytes() == b"{}\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_signal_before_the_first_step_exits_with_nothing_to_save_and_resume_starts_the_run(env, uninterrupted,
                                                                                              tmp_path, capsys,
                                                                                              monkeypatch):
    """Stopped before its first checkpoint (a signal while setting up; likewise a first save that fails on a
    full disk), the directory holds config.json and no checkpoint: --resume runs it from step 0 with that config,
    and says so, ending where the uninterrupted run ended."""
    reference_dir, _ = uninterrupted
    set_up = mnist.set_up

    def signalled_while_setting_up(*args):
        job = set_up(*args)
        os.kill(os.getpid(), signal.SIGTERM)  # caught: the job has claimed its directory
        return job

    monkeypatch.setattr(mnist, "set_up", signalled_while_setting_up)
    with pytest.raises(SystemExit) as stopped:
        mnist.main(["--data", env["data"], "--workdir", str(tmp_path / "w"), *TINY])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by signal 15 before the first step at 0: nothing to save" in capsys.readouterr().err
    assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())
    monkeypatch.undo()

    rc, out, err = run_main(["--resume", "--workdir", str(tmp_path / "w")], capsys)
    assert rc == 0, err
    assert f"--resume: {tmp_path / 'w'} holds no checkpoint yet: the run starts at step 0 with its config.json" in out
    assert metrics(tmp_path / "w") == metrics(reference_dir)


def test_a_second_signal_exits_at_once(monkeypatch, capsys):
    """The first signal asks for a checkpoint at the next step; a second one (a save that hangs, an impatient
    user) ends the process there, with 128 + its number."""
    exits = []
    monkeypatch.setattr(rundir.os, "_exit", exits.append)
    stop = rundir.StopFlag()
    stop(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT and exits == []
    stop(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]
    assert "stopped by a second signal 15: exiting at once" in capsys.readouterr().err


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_saves_nothing_bad(env, capsys, unoptimised_compile):
    workdir = env["root"] / "nan"
    argv = ["--data", env["data"], "--workdir", str(workdir), *TINY[:-4], "--epochs", "1", "--lr", "1e30"]
    rc, _, err = run_main(argv, capsys)
    assert rc == 1 and "the loss became" in err and "Last good checkpoint: none" in err
    # stderr also carries the progress lines; the error is the one line after them
    assert err.rstrip().splitlines()[-1].startswith("error: the loss became") and "Traceback" not in err
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


@pytest.mark.slow
def test_batch_size_must_divide_over_the_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.mnist", "--data", "sample", "--batch-size", "7", "--devices", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: batch size 7 does not divide over 2 devices; use a multiple of 2 "
                                   "(for example 6 or 8)")


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit, match="^0$"):  # the exit status
        mnist.main(["--help"])
    explained = job_runs.explained_flags(capsys.readouterr().out)
    assert sorted(explained) == sorted([
        "--help", "--data", "--data-dir", "--preset", "--variant", "--epochs", "--batch-size", "--lr", "--momentum",
        "--image-size", "--init", "--seed", "--workdir", "--resume", "--devices", "--coordinator",
        "--num-processes", "--process-id", "--dtype", "--no-compile-cache", "--system-malloc", "--bn-recalibrate"])
    assert [flag for flag, text in explained.items() if not text] == []


def test_a_failed_save_leaves_no_thread_of_it_reporting_after_the_one_line(tmp_path, capsys, caplog, monkeypatch):
    """After a failed checkpoint write the run ends with one line; a thread of the failed save still ending (orbax's,
    on its closed event loop: "RuntimeError: Event loop is closed", seen in 1 of ~13 runs with a full disk from the
    start) prints no traceback after it."""
    checkpoints = rundir.Checkpoints(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.manager, "save", disk_full)
    reported = []
    monkeypatch.setattr(threading, "excepthook", reported.append)  # Python's default prints the traceback
    for name in ("asyncio", "concurrent.futures"):  # restored after this test too
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
    with pytest.raises(TrainingError, match="No space left on device"):
        checkpoints.save(1, {"x": np.zeros(2)}, [])

    def ending_on_a_closed_loop():
        raise RuntimeError("Event loop is closed")

    thread = threading.Thread(target=ending_on_a_closed_loop)
    thread.start()
    thread.join()
    future = concurrent.futures.Future()  # or a callback of one of its futures, which concurrent.futures logs
    future.add_done_callback(lambda _: ending_on_a_closed_loop())
    future.set_result(None)
    assert reported == [] and capsys.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.name == "concurrent.futures"] == []


def test_after_a_failed_save_only_the_main_thread_writes_to_stderr(tmp_path, capsys, monkeypatch):
    """A traceback written straight to sys.stderr by another thread after a failed checkpoint write (a callback of
    the failed save run on a thread of its own, reported as Python reports an exception no caller can catch:
    "RuntimeError: Event loop is closed" from asyncio's call_soon_threadsafe, in CI's run at dd0acbe, its lines
    interleaved with the one line) is dropped; the main thread's one line is written."""
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # restored after the test
    checkpoints = rundir.Checkpoints(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.manager, "save", disk_full)
    with pytest.raises(TrainingError, match="No space left on device") as failed:
        checkpoints.save(1, {"x": np.zeros(2)}, [])

    def reporting_on_its_own():
        sys.stderr.write("Traceback (most recent call last):\nRuntimeError: Event loop is closed\n")

    thread = threading.Thread(target=reporting_on_its_own)
    thread.start()
    thread.join()
    print(f"error: {failed.value}", file=sys.stderr)
    assert capsys.readouterr().err == f"error: {failed.value}\n"
