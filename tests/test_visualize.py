"""Feature visualisation and attribution (jax_googlenet.visualize, experiments.visualize).

References: lucent 0.1.8 (torch-lucent, the PyTorch port of Lucid) for the parameterisations and objectives, run
on the same numbers; two GoogLeNets trained here on the shipped MNIST digits for what renders show; the
completeness axiom of integrated gradients (Sundararajan et al. 2017) for the attributions.
"""

from __future__ import annotations

import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from lucent.optvis import objectives as lucent_objectives
from lucent.optvis.param import color as lucent_color
from lucent.optvis.param import spatial as lucent_spatial

from experiments import visualize as cli
from jax_googlenet import checkpoint, data, train
from jax_googlenet.model import googlenet
from jax_googlenet.ops import plan
from jax_googlenet.visualize import attribution, objectives as obj, param, render, transforms as T

render_module = importlib.import_module("jax_googlenet.visualize.render")  # `render` names its function

SIDE = 32  # the MNIST job's default image size for the torchvision variant
TRAIN_STEPS, TRAIN_BATCH = 150, 32  # 93.8% and 95.7% on the held-out digits (seeds 0, 1; 97% at 300 steps)


# ----------------------------------------------------------------------------------------------- lucent


@pytest.mark.parametrize("side", [16, 15])
def test_fourier_image_and_colour_space_equal_lucents(side):
    """The same spectrum through lucent's fft_image (1/f scaling, inverse FFT, / 4) and to_valid_rgb
    (decorrelated colour, sigmoid) gives our image to float32 rounding (1e-6 on values in [0, 1])."""
    p = param.ImageParam(side, channels=3, batch=2, kind="fourier", decorrelate=True, sd=0.5)
    spectrum = np.asarray(p.init(jax.random.key(0)))
    params, image_f = lucent_spatial.fft_image((2, 3, side, side), sd=0.5)
    with torch.no_grad():
        params[0].copy_(torch.from_numpy(spectrum.copy()))
        theirs = lucent_color.to_valid_rgb(image_f, decorrelate=True)().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(p.image(jnp.asarray(spectrum))), theirs, atol=1e-6)
    np.testing.assert_array_equal(param.rfft2d_freqs(side, side + 1), lucent_spatial.rfft2d_freqs(side, side + 1))
    np.testing.assert_array_equal(param.COLOR_MATRIX, lucent_color.color_correlation_normalized)


def test_grey_images_have_one_channel_and_no_colour_space():
    p = param.ImageParam(8, channels=1, kind="pixels", decorrelate=True)
    assert not p.decorrelate
    assert p.image(p.init(jax.random.key(0))).shape == (1, 8, 8, 1)


def _lucent_value(objective, acts_nhwc: np.ndarray) -> float:
    """lucent's objective (a loss: minus the value) on activations given as NHWC."""
    t = torch.from_numpy(np.ascontiguousarray(acts_nhwc.transpose(0, 3, 1, 2)))
    return -float(objective(lambda layer: t))


def _ours(objective: obj.Objective, acts: np.ndarray) -> np.ndarray:
    return np.asarray(obj.evaluate(objective.structure(), objective.arrays(), {"mixed": jnp.asarray(acts)},
                                   objective.batch if acts.shape[0] == objective.batch else acts.shape[0]))


def test_objectives_equal_lucents_and_compose():
    """channel, neuron, direction and diversity on the same activations give lucent's values (per image here,
    summed over the batch there), and `a + 2 * b` is the sum of the values."""
    acts = np.random.default_rng(0).normal(size=(4, 5, 6, 8)).astype(np.float32)
    vec = np.random.default_rng(1).normal(size=8).astype(np.float32)
    cases = [
        (obj.channel("mixed", [1, 3, 5, 7]), sum(lucent_objectives.channel("mixed", c, batch=i)
                                                  for i, c in enumerate([1, 3, 5, 7]))),
        (obj.neuron("mixed", 2, y=1, x=4), lucent_objectives.neuron("mixed", 2, x=4, y=1) * 4),
        (obj.direction("mixed", vec), lucent_objectives.direction("mixed", torch.from_numpy(vec)) * 4),
        # lucent's diversity returns the value itself, not a loss: its notebooks subtract it from the loss.
        (obj.diversity("mixed"), -1 * lucent_objectives.diversity("mixed")),
    ]
    for ours, theirs in cases:
        np.testing.assert_allclose(_ours(ours, acts).sum(), _lucent_value(theirs, acts), rtol=1e-5, atol=1e-6)
    a, b = obj.channel("mixed", [0, 1, 2, 3]), obj.diversity("mixed")
    np.testing.assert_allclose(_ours(a + 2 * b, acts), _ours(a, acts) + 2 * _ours(b, acts), rtol=1e-6)
    assert (a + 2 * b).names == ("mixed_0", "mixed_1", "mixed_2", "mixed_3")
    assert obj.logit(range(3)).names == ("logit_0", "logit_1", "logit_2")


def test_transforms_off_are_the_identity_and_on_keep_the_shape():
    images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3))
    np.testing.assert_array_equal(T.apply(T.NONE, jax.random.key(1), images, 16), images)
    moved = T.apply(T.STANDARD, jax.random.key(1), images, 24)
    assert moved.shape == (3, 24, 24, 3) and not np.allclose(moved[0], moved[1])


# ----------------------------------------------------------------------------------------------- CLI input


def _cli(argv, capsys):
    status = cli.main([str(a) for a in argv])
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv, says", [
    (["--weights", "missing.pth", "--logits", "0-9"], "no such file"),
    (["--weights", ".", "--channels", "0-3"], "--channels needs --layer"),
    (["--weights", ".", "--attribute", "x.png"], "--attribute needs --target"),
    (["--weights", ".", "--logits", "0-9"], "neither a .pth file"),
    (["--weights", ".", "--logits", "0-9", "--steps", "0"], "--steps must be positive"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.chdir(tmp_path)
    status, err = _cli(argv + ["--out", tmp_path / "out"], capsys)
    assert status == 2 and len(err) == 1 and says in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_out_directory_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    status, err = _cli(["--weights", tmp_path, "--logits", "0", "--out", tmp_path / "out"], capsys)
    assert status == 2 and "already exists" in err[0]


# ----------------------------------------------------------------------------------------------- trained models


@pytest.fixture(scope="module")
def digits():
    return data.load_sample()


def train_models(digits, seeds=(0, 1)):
    """GoogLeNets (torchvision variant, 1 channel, 32x32) trained on the 4,000 shipped training digits, one per
    seed: (model, [variables, ...]). One compiled init and one compiled step (the random shift inside it) serve
    every seed: train.create_train_state jits a new init each call, which compiled again for the second seed
    (26 s on 2 CPU cores, as long as the train step, measured)."""
    model = googlenet("torchvision", num_classes=10, in_channels=1, aux_logits=False)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 2e-3, TRAIN_STEPS // 10, TRAIN_STEPS))
    # The init compiled with LLVM at level 1 and XLA:CPU's elemental emitters: 18.4 -> 9.6 s with the level, then
    # 10.2 -> 9.2 s (medians of three processes each) with the emitters, its parameters bit-identical to the
    # default options' (level 0, the library's choice for jobs, changes their last bits, and the renders' checks
    # depend on the trained model to the bit: a channel of inception4a ended dead; benchmarks/NOTES.md).
    init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 1, **plan.ELEMENTAL_EMITTERS})
    init_opt = jax.jit(tx.init)
    preprocess = data.make_preprocess(SIDE)

    @functools.partial(jax.jit, donate_argnums=0)  # the state updated in place: 76 -> 58 ms a step, measured
    def step(state, images, labels, shift_key, dropout_key):
        batch = {"image": data.random_shift(images, shift_key, 2), "label": labels}
        return train.train_step(state, batch, dropout_key, preprocess=preprocess)[0]

    images, labels = digits.train.images, digits.train.labels
    trained = []
    for seed in seeds:
        variables = init(jax.random.key(seed), jnp.zeros((1, SIDE, SIDE, 1), jnp.float32))
        # The optimizer's zeros as one program (TrainState.create compiles one per parameter shape, eagerly).
        state = train.TrainState(step=0, apply_fn=model.apply, params=variables["params"], tx=tx,
                                 opt_state=init_opt(variables["params"]), batch_stats=variables["batch_stats"])
        rng = np.random.default_rng(seed)
        for i in range(TRAIN_STEPS):
            idx = rng.integers(0, len(labels), TRAIN_BATCH)
            state = step(state, images[idx], labels[idx], jax.random.key(1000 * seed + i), jax.random.key(seed))
        # Committed to device 0, as checkpoint.load_model restores variables: jit's cache keys on the placement,
        # so the CLI's render of a saved model reuses the renders' compiled step (36 s -> 2 s, measured).
        trained.append(jax.device_put({"params": state.params, "batch_stats": state.batch_stats}, jax.devices()[0]))
    return model, trained


@pytest.fixture(scope="module")
def mnist_models(digits):
    """Two GoogLeNets trained with seeds 0 and 1 (`train_models`): (model, [variables0, variables1])."""
    return train_models(digits)


@functools.lru_cache(maxsize=None)
def _probabilities(model):
    return jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, (x - data.MEAN) / data.STD, train=False)))


@functools.lru_cache(maxsize=None)
def _logits(model):
    """The model's logits, jitted: run op by op, GoogLeNet's forward compiles each operation on its own (5x the
    time of compiling it whole, measured)."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def _held_out(digits):
    x = digits.test.images.astype(np.float32) / 255.0
    return np.asarray(jax.image.resize(x, (len(x), SIDE, SIDE, 1), "bilinear")), digits.test.labels


@pytest.mark.slow
def test_fixture_models_classify_held_out_digits(mnist_models, digits):
    model, (v0, v1) = mnist_models
    x, y = _held_out(digits)
    for v in (v0, v1):
        assert np.mean(np.asarray(_probabilities(model)(v, x)).argmax(-1) == y) >= 0.9


def _render_logits(model, variables, steps=256, key=0):
    """What `python -m experiments.visualize --logits 0-9` renders: Fourier images, the small-image transforms
    padding with MNIST's black."""
    return render(model, variables, obj.logit(range(10)), steps=steps, lr=0.05, key=jax.random.key(key),
                  size=SIDE, kind="fourier", transforms=T.for_size(SIDE, 0.0), mean=data.MEAN, std=data.STD)


@pytest.mark.slow
def test_logit_renders_are_their_digits_for_the_model_and_for_another_seed(mnist_models):
    """Fourier images under random transforms: the digit for the model that rendered them (>= 9 of
    10 at p >= 0.9) and for a model trained with another seed (>= 8 of 10 at p >= 0.5), so they are not
    adversarial noise of one network."""
    model, (v0, v1) = mnist_models
    compiled = render_module._step._cache_size()
    result = _render_logits(model, v0)
    # one compiled step for the whole render: its first call's image and optimiser state placed as every later
    # call's (each render compiled it twice, 12 s more at this size, before they were)
    assert render_module._step._cache_size() == compiled + 1
    assert result.images.shape == (10, SIDE, SIDE, 1)
    assert np.all(result.final > result.trace[0])
    p = [np.asarray(_probabilities(model)(v, jnp.asarray(result.images)))[np.arange(10), np.arange(10)]
         for v in (v0, v1)]
    assert np.sum(p[0] >= 0.9) >= 9, p[0]
    assert np.sum(p[1] >= 0.5) >= 8, p[1]


@pytest.mark.slow
def test_the_same_key_gives_the_same_images(mnist_models):
    model, (v0, _) = mnist_models
    a, b, c = (_render_logits(model, v0, steps=3, key=k) for k in (7, 7, 8))
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.allclose(a.images, c.images)


@pytest.mark.slow
def test_a_channel_render_beats_every_held_out_digit(mnist_models, digits):
    """Channels 0-3 of inception4a rendered (Fourier, no transforms: the value is read on the image itself): each
    ends above that channel's largest mean activation over the 1,000 held-out digits. Measured after 256 steps at
    lr 0.2: 3.06, 2.76, 4.52, 3.94 against 1.42, 1.67, 1.76, 1.85 (channel 1, the closest, 65% above). lr 0.2
    because at 0.05 a channel of the models trained 300 steps stopped 2% short of its best digit."""
    model, (v0, _) = mnist_models
    channels = [0, 1, 2, 3]
    x, _ = _held_out(digits)
    feats = jax.jit(lambda v, x: model.apply(v, (x - data.MEAN) / data.STD, method=type(model).features)
                    ["inception4a"].mean(axis=(1, 2)))(v0, x)
    best = np.asarray(feats)[:, channels].max(axis=0)
    result = render(model, v0, obj.channel("inception4a", channels), steps=256, lr=0.2, key=jax.random.key(0),
                    size=SIDE, transforms=T.NONE, mean=data.MEAN, std=data.STD)
    assert np.all(result.final > best), (result.final, best)


@pytest.mark.slow
def test_integrated_gradients_sum_to_the_logit_difference(mnist_models, digits):
    """Completeness: sum of attributions = logit(image) - logit(black), within 1% (256 trapezoid steps)."""
    model, (v0, _) = mnist_models
    x, y = _held_out(digits)
    image, target = jnp.asarray(x[:1]), int(y[0])
    attr = attribution.integrated_gradients(model, v0, image, target, None, jnp.asarray([data.MEAN]),
                                            jnp.asarray([data.STD]))
    logits = _logits(model)(v0, (jnp.concatenate([image, jnp.zeros_like(image)]) - data.MEAN) / data.STD)
    difference = float(logits[0, target] - logits[1, target])
    assert abs(float(attr.sum()) - difference) <= 0.01 * abs(difference), (float(attr.sum()), difference)


@pytest.mark.slow
def test_cli_renders_and_attributes_a_trained_model_directory(mnist_models, digits, tmp_path, capsys):
    """The CLI on a model directory: its image size and normalisation from the directory, one PNG per
    objective named after it, grid.png, objectives.json; an attribution's overlay and values."""
    model, (v0, _) = mnist_models
    weights = checkpoint.save_model(tmp_path / "model", v0, {"variant": "torchvision", "num_classes": 10,
                                                             "in_channels": 1, "aux_logits": False})
    status, err = _cli(["--weights", weights, "--logits", "0-9", "--steps", "2", "--out", tmp_path / "logits"],
                       capsys)
    assert status == 0, err
    out = tmp_path / "logits"
    assert sorted(p.name for p in out.iterdir()) == sorted([f"logit_{i}.png" for i in range(10)]
                                                           + ["grid.png", "objectives.json"])
    meta = json.loads((out / "objectives.json").read_text())
    assert [o["name"] for o in meta["objectives"]] == [f"logit_{i}" for i in range(10)]
    assert meta["input_size"] == SIDE and meta["mean"] == [pytest.approx(data.MEAN)]
    from PIL import Image

    assert Image.open(out / "logit_3.png").size == (SIDE, SIDE)
    x, y = _held_out(digits)
    attribution.save_png(tmp_path / "digit.png", x[0])
    status, err = _cli(["--weights", weights, "--attribute", tmp_path / "digit.png", "--target", int(y[0]),
                        "--out", tmp_path / "attr"], capsys)
    assert status == 0, err
    meta = json.loads((tmp_path / "attr" / "attribution.json").read_text())
    assert meta["predicted"] == int(y[0]) and (tmp_path / "attr" / "attribution.png").is_file()
