"""Precise BatchNorm statistics against torch: torchvision's GoogLeNet in training mode over the same batches.

Reference: torch's BatchNorm2d with momentum=None keeps the cumulative average of the batch means, over equal
batches the population mean; the population's unbiased variance is computed from each BatchNorm's inputs,
captured by forward hooks. Both sides run in float64, so the comparison checks the definition, not the forward's
rounding: in float32 the two forward passes' BatchNorm inputs drift apart with depth (training-mode BatchNorm
over inception5's 16 positions a batch), to 2e-5 relative in inception5b's variances. Tolerance 1e-9 relative
per layer: float64 summation order (measured below 1e-12).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import job_runs
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

from convert.torchvision import randomise_batch_norm
from convert import torchvision_to_flax
from jax_googlenet import distributed
from jax_googlenet.model import googlenet
from jax_googlenet.recalibrate import _moments_step, precise_batch_norm

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # conftest.py: compiled for what it computes

SIDE, BATCH, BATCHES = 64, 4, 3
ROOT = Path(__file__).resolve().parents[1]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def flax_path(torch_name: str) -> tuple[str, ...]:
    """torch's "inception3a.branch2.0.bn" as our ("inception3a", "branch2_0", "bn")."""
    out = []
    for part in torch_name.split("."):
        if part.isdigit():
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def reference(dtype=np.float32):
    """(our model, its variables, the batches, {BatchNorm path: (torch's cumulative mean, population mean,
    unbiased variance)}) in `dtype`: torchvision's GoogLeNet with aux heads, BatchNorm randomised, 3 batches of
    4 images."""
    torch.manual_seed(0)
    tm = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=10)
    randomise_batch_norm(tm)
    tm = tm.to(getattr(torch, np.dtype(dtype).name))
    model = googlenet("torchvision", num_classes=10, aux_logits=True, dtype=dtype, param_dtype=dtype)
    variables = jax.tree.map(lambda a: np.asarray(a, dtype), torchvision_to_flax(tm.state_dict(), model=model))
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(BATCH, SIDE, SIDE, 3)).astype(dtype) for _ in range(BATCHES)]
    inputs, hooks = {}, []
    for name, m in tm.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: inputs.setdefault(name, []).append(args[0].double())))
    with torch.no_grad():
        for x in batches:
            tm.train()(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    for h in hooks:
        h.remove()
    ref = {}
    for name, m in tm.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            x = torch.cat(inputs[name]).transpose(0, 1).reshape(m.num_features, -1)
            ref[flax_path(name)[:-1] + ("bn",)] = (m.running_mean.numpy(), x.mean(1).numpy(),
                                                   x.var(1, correction=1).numpy())
    return model, variables, batches, ref


def test_precise_statistics_are_the_population_mean_and_unbiased_variance_of_torchs_batchnorm_inputs():
    """Every BatchNorm (59, the aux heads' two included), on a batch sharded over a mesh of the devices."""
    with jax.enable_x64(True):
        model, variables, batches, ref = reference(np.float64)
        mesh = distributed.make_mesh()
        sharded = (distributed.shard_batch({"image": x}, mesh) for x in batches)
        stats = precise_batch_norm(model, variables, sharded, mesh=mesh)
    assert stats.images == BATCH * BATCHES and stats.summary() == "recalibrated BatchNorm over 12 images"
    assert len(ref) == 59
    assert {p[:-1] for p in traverse_util.flatten_dict(stats.batch_stats)} == set(ref)
    for path, (cumulative, mean, var) in ref.items():
        node = stats.batch_stats
        for p in path:
            node = node[p]
        assert node["var"].dtype == np.float64
        assert rel(node["mean"], cumulative) < 1e-9, path
        assert rel(node["mean"], mean) < 1e-9, path
        assert rel(node["var"], var) < 1e-9, path


def test_precise_statistics_stop_at_max_images_or_a_padded_batch_and_leave_the_variables_alone():
    """Whole batches until the next would pass max_images or is padded (float32), one compiled step for the
    calls; the variables given are not changed."""
    model, variables, batches, _ = reference()
    before = variables["batch_stats"]["conv1"]["bn"]["var"].copy()
    limited = precise_batch_norm(model, variables, iter(batches), max_images=2 * BATCH + 1)
    compiled = _moments_step.cache_info().currsize
    padded = [{"image": x, "mask": np.arange(BATCH) < (BATCH if i < 2 else 1)} for i, x in enumerate(batches)]
    first_two = precise_batch_norm(model, variables, padded)
    assert _moments_step.cache_info().currsize == compiled
    assert limited.images == first_two.images == 2 * BATCH
    np.testing.assert_array_equal(limited.batch_stats["inception5b"]["branch1"]["bn"]["var"],
                                  first_two.batch_stats["inception5b"]["branch1"]["bn"]["var"])
    np.testing.assert_array_equal(variables["batch_stats"]["conv1"]["bn"]["var"], before)
    assert not np.allclose(limited.batch_stats["conv1"]["bn"]["var"], before)


def test_precise_statistics_refuse_a_model_without_batch_norm():
    with pytest.raises(ValueError, match="the paper variant, without them"):
        precise_batch_norm(googlenet("paper", num_classes=10), {"params": {}}, [])


TWO_DEVICES = """
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from jax_googlenet import distributed
from jax_googlenet.model import googlenet
from jax_googlenet.recalibrate import precise_batch_norm
from test_export import init
model = googlenet("torchvision", num_classes=10, aux_logits=False, dtype=np.float64, param_dtype=np.float64)
variables = jax.tree.map(lambda a: np.asarray(a, np.float64), init(model, 32))
batches = [np.random.default_rng(i).normal(size=(4, 32, 32, 3)) for i in range(2)]
mesh = distributed.make_mesh()
sharded = precise_batch_norm(model, variables, (distributed.shard_batch({"image": x}, mesh) for x in batches),
                             mesh=mesh)
whole = precise_batch_norm(model, variables, batches)
a, b = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(s.batch_stats)]) for s in (sharded, whole))
print(json.dumps({"devices": mesh.size, "images": sharded.images, "rel": float(np.abs(a - b).max() / np.abs(b).max())}))
"""


@pytest.mark.slow
def test_precise_statistics_over_two_devices_are_those_of_the_whole_batch_on_one():
    """Each batch split over two simulated CPU devices (a subprocess: the flag must precede JAX's start): the
    statistics reduce over both, equal to the unsharded batch's within 1e-9, in float64 (its summation order;
    in float32 the two forward passes drift apart through training-mode BatchNorm over inception5's 4 positions
    a batch at 32 pixels)."""
    # Compiled for this comparison alone: most optimisations off and the elemental emitters (14.4 -> 9.6 s).
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {job_runs.ELEMENTAL_EMITTERS}",
               JAX_ENABLE_X64="1", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    out = subprocess.run([sys.executable, "-c", TWO_DEVICES], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["devices"] == 2 and result["images"] == 8
    assert result["rel"] < 1e-9
