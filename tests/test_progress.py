"""Training progress (experiments.progress): tqdm's live bar on a terminal, a plain line every tenth of the
epoch or every 30 s anywhere else, nothing on processes other than the first."""

import io

from experiments import progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def lines(total, *, initial=0, clock=None):
    out = io.StringIO()
    shown = progress.Lines(total, desc="epoch 1/7", initial=initial, unit="img", file=out,
                           clock=clock or Clock())
    return shown, out


def test_not_a_terminal_gets_a_plain_line_at_each_tenth_with_loss_and_rate():
    clock = Clock()
    shown, out = lines(3968, clock=clock)  # 62 steps of 64: the MNIST quick preset's epoch
    for step in range(62):
        clock.now += 0.25  # 256 img/s
        shown.update(64, loss=2.0 - step / 100)
    shown.close()
    text = out.getvalue()
    assert "\r" not in text
    printed = text.splitlines()
    assert len(printed) == 10
    assert printed[0] == "epoch 1/7: 448/3,968 img (11%), loss 1.9400, 256.0 img/s"
    assert printed[-1] == "epoch 1/7: 3,968/3,968 img (100%), loss 1.3900, 256.0 img/s"


def test_a_slow_epoch_still_gets_a_line_every_30_s():
    clock = Clock()
    shown, out = lines(10_000, clock=clock)
    for _ in range(3):
        clock.now += 31.0
        shown.update(10, loss=1.0)  # far from the next tenth
    assert [line.split(", ")[-1] for line in out.getvalue().splitlines()] == ["0.3 img/s"] * 3


def test_a_resumed_epoch_counts_from_where_it_stands():
    shown, out = lines(1000, initial=450)
    shown.update(40, loss=1.0)
    assert out.getvalue() == ""
    shown.update(10, loss=1.0)
    assert out.getvalue().startswith("epoch 1/7: 500/1,000 img (50%)")


def test_bar_chooses_lines_for_a_file_and_tqdm_for_a_terminal():
    to_file, to_terminal = io.StringIO(), FakeTerminal()
    for file in (to_file, to_terminal):
        with progress.bar(100, desc="epoch 1/3", file=file) as shown:
            for _ in range(4):
                shown.update(25, loss=0.5)
    assert "\r" not in to_file.getvalue() and len(to_file.getvalue().splitlines()) == 4
    bar = to_terminal.getvalue()
    assert bar.count("\r") >= 2 and "epoch 1/3: 100%" in bar and "100/100" in bar and "loss=0.5000" in bar


def test_only_the_lead_process_shows_progress():
    out = FakeTerminal()
    with progress.bar(100, desc="epoch 1/3", file=out, disable=True) as shown:
        shown.update(100, loss=0.5)
    assert out.getvalue() == ""


def test_an_evaluation_shows_its_progress_without_a_loss():
    clock = Clock()
    shown, out = lines(1000, clock=clock)
    for _ in range(10):
        clock.now += 1.0
        shown.update(100)
    assert out.getvalue().splitlines()[0] == "epoch 1/7: 100/1,000 img (10%), 100.0 img/s"


def test_each_line_of_an_epoch_reports_the_rate_its_steps_ran_at(tmp_path, monkeypatch):
    """The training loop shows a step once its metrics are ready, not a step later: a 0.25 s step of 32 images
    reads 128 img/s on every line, the epoch's last too (read a step late, it would get a near-zero interval)."""
    import jax.numpy as jnp
    import numpy as np

    from experiments import loop, rundir
    from jax_googlenet import distributed

    clock, out = Clock(), io.StringIO()
    monkeypatch.setattr(progress, "bar", lambda total, **kw: progress.Lines(
        total, desc=kw["desc"], initial=kw["initial"], unit="img", file=out, clock=clock))

    def train_step(state, batch):  # runs on the calling thread, as CPU steps do
        clock.now += 0.25
        return state, {"loss": jnp.float32(0.5), "accuracy": jnp.float32(1.0)}

    batch = {"image": np.zeros((32, 1), np.float32), "label": np.zeros(32, np.int32)}
    job = loop.Job(cfg={"epochs": 1, "batch_size": 32}, workdir=tmp_path, mesh=distributed.make_mesh(1),
                   state=None, steps_per_epoch=3, train_step=train_step, eval_step=None,
                   train_batches=lambda epoch, start: [batch] * 3, eval_batches=None)
    loop.train_epoch(job, 0, rundir.StopFlag())
    assert out.getvalue().splitlines() == [
        f"epoch 1/1: {n}/96 img ({p}%), loss 0.5000, 128.0 img/s" for n, p in ((32, 33), (64, 67), (96, 100))]
