"""The training library for transfer learning: the linear probe leaves the backbone bit for bit, the backbone's
learning rate scale, label smoothing as torch's and masked rows. One tiny RGB model (torchvision variant,
3 classes, 16 px, no aux heads), its variables drawn in numpy, serves the module. The evaluation's top-5 and
confusion matrix are checked against torchvision in tests/test_finetune_cli.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jax_googlenet import imagenet, train
from jax_googlenet.checkpoint import abstract_variables
from jax_googlenet.model import googlenet

SIZE, CLASSES = 16, 3


def random_variables(model, seed=0):
    """Variables of `model` drawn in numpy from their abstract shapes (no `init` to compile): kernels with
    variance 1/fan-in, BatchNorm scales and variances 1, biases and means 0."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(leaf.dtype)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(model))


@pytest.fixture(scope="module")
def tiny():
    model = googlenet("torchvision", num_classes=CLASSES, aux_logits=False)
    tx = train.make_optimizer(0.1, weight_decay=1e-3, freeze_backbone=True)
    variables = random_variables(model)
    state = train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                    batch_stats=variables["batch_stats"])
    rng = np.random.default_rng(0)
    labels = np.arange(8) % CLASSES
    images = np.clip(rng.normal(60 + 60 * labels[:, None, None, None], 20, (8, SIZE, SIZE, 3)), 0, 255)
    return state, {"image": images.astype(np.uint8), "label": labels.astype(np.int32)}


def bits(tree):
    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_linear_probe_trains_fc_and_leaves_every_backbone_parameter_and_statistic_bit_identical(tiny):
    state, batch = tiny
    # A negative zero in the backbone: an update that added +0.0 would turn it into +0.0.
    params = jax.tree.map(jnp.copy, state.params)
    params["conv1"]["bn"]["bias"] = params["conv1"]["bn"]["bias"].at[0].set(-0.0)
    state = state.replace(params=params)
    before = jax.device_get(state)
    step = jax.jit(lambda s, b: train.probe_step(s, b, preprocess=imagenet.normalize))
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    after = jax.device_get(state)
    assert losses[-1] < losses[0], losses
    assert not np.array_equal(after.params["fc"]["kernel"], before.params["fc"]["kernel"])
    backbone = lambda p: {k: v for k, v in p.items() if k != "fc"}  # noqa: E731
    assert bits(backbone(after.params)) == bits(backbone(before.params))
    assert bits(after.batch_stats) == bits(before.batch_stats)
    assert np.signbit(after.params["conv1"]["bn"]["bias"][0])


def test_param_groups_name_the_heads_and_the_probe_trains_fc_alone():
    params = abstract_variables(googlenet("torchvision", num_classes=CLASSES))["params"]
    groups = train.param_groups(params)
    assert groups["fc"]["kernel"] == groups["aux1"]["fc2"]["bias"] == groups["aux2"]["fc2"]["kernel"] == "head"
    assert groups["aux1"]["fc1"]["kernel"] == groups["conv1"]["conv"]["kernel"] == "backbone"
    probe = train.param_groups(params, freeze_backbone=True)
    assert probe["fc"]["kernel"] == "head" and probe["aux1"]["fc2"]["kernel"] == "backbone"


def test_backbone_lr_scale_scales_the_backbones_updates_only():
    params = {"fc": {"kernel": jnp.ones((2, 3))}, "aux1": {"fc2": {"bias": jnp.ones(3)}, "fc1": {"bias": jnp.ones(4)}},
              "conv1": {"conv": {"kernel": jnp.ones((3, 3, 3, 4))}}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    kw = dict(momentum=0.9, weight_decay=1e-2, schedule="cosine", total_steps=10, warmup_steps=2)
    full, scaled = train.make_optimizer(0.1, **kw), train.make_optimizer(0.1, backbone_lr_scale=0.1, **kw)
    s_full, s_scaled = full.init(params), scaled.init(params)
    for _ in range(3):  # past warmup's first step, where the learning rate is 0
        d_full, s_full = full.update(grads, s_full, params)
        d_scaled, s_scaled = scaled.update(grads, s_scaled, params)
    groups = train.param_groups(params)
    for g, a, b in zip(jax.tree.leaves(groups), jax.tree.leaves(d_full), jax.tree.leaves(d_scaled)):
        np.testing.assert_allclose(b, a * (0.1 if g == "backbone" else 1.0), rtol=1e-6)
        assert np.abs(a).min() > 0


def test_label_smoothing_is_torchs_cross_entropy_and_masked_rows_do_not_count():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 5)).astype(np.float32), rng.integers(0, 5, 6)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(torch.from_numpy(logits), torch.from_numpy(labels))
    ours = train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=0.1)
    assert float(ours) == pytest.approx(float(ref), rel=1e-6)
    mask = jnp.array([1, 1, 1, 0, 0, 0], jnp.float32)
    masked = train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), weights=mask)
    first = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits[:3]), jnp.asarray(labels[:3])).mean()
    assert float(masked) == pytest.approx(float(first), rel=1e-6)
