"""Numerical parity with PyTorch: torchvision 0.29's GoogLeNet (and the write-up's model for the seed variant) and
ours, with the same weights (converted by `convert`), the same inputs, float32 at the highest precision both sides.

Tolerances are relative errors ||ours - torch|| / ||torch||, the tightest that pass reliably; each says why.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import torchvision

from convert import flax_to_torchvision, torchvision_to_flax
from jax_googlenet.model import VARIANTS, GoogLeNet
from jax_googlenet.train import classification_loss, make_optimizer
from writeup_model import GoogLeNet as WriteupGoogLeNet

# Forward outputs: 22 float32 layers (summation order differs between XLA and torch's CPU kernels) give
# 1e-7..2e-5 measured; 1e-4 is the bound and is met with a 5x margin.
FORWARD_RTOL = 1e-4
LR, MOMENTUM = 0.1, 0.9


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def without_dropout(variant: str) -> GoogLeNet:
    return GoogLeNet(dataclasses.replace(VARIANTS[variant], dropout=0.0, aux_dropout=0.0))


@pytest.fixture(scope="module")
def variables(torchvision_state_dict):
    return torchvision_to_flax(torchvision_state_dict)


def torch_googlenet(state_dict, **kw) -> torch.nn.Module:
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, dropout=0.0,
                                         dropout_aux=0.0, **kw)
    model.load_state_dict(state_dict, strict=True)
    return model


# ----------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("side, batch, transform_input", [(224, 2, False), (224, 2, True), (225, 2, False),
                                                          (97, 1, True)])
def test_eval_logits_equal_torchvision(torchvision_state_dict, variables, side, batch, transform_input):
    torch_model = torch_googlenet(torchvision_state_dict, transform_input=transform_input).eval()
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(side))
    with torch.no_grad():
        ref = torch_model(x).numpy()
    model = GoogLeNet(VARIANTS["torchvision"], transform_input=transform_input)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc(x))
    assert ours.shape == ref.shape
    assert rel(ours, ref) < FORWARD_RTOL


# ----------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def train_step_pair(torchvision_state_dict, variables):
    """One SGD-momentum step with the aux-weighted loss on both sides, dropout off, batch 2 at 224."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 917])
    torch_model = torch_googlenet(torchvision_state_dict).train()
    out = torch_model(x)
    loss = F.cross_entropy(out.logits, labels) + 0.3 * (F.cross_entropy(out.aux_logits1, labels)
                                                          + F.cross_entropy(out.aux_logits2, labels))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in torch_model.named_parameters()}
    torch.optim.SGD(torch_model.parameters(), lr=LR, momentum=MOMENTUM).step()
    ref = {"outputs": [t.detach().numpy() for t in (out.logits, out.aux_logits1, out.aux_logits2)],
           "loss": loss.item(), "grads": grads, "state": torch_model.state_dict()}

    model, tx = without_dropout("torchvision"), make_optimizer(LR, momentum=MOMENTUM)

    @jax.jit
    def step(variables, images, labels):
        def loss_fn(params):
            outputs, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                           train=True, mutable=["batch_stats"])
            return classification_loss(outputs, labels, "paper"), (outputs, updates["batch_stats"])

        (loss, (outputs, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
        return loss, outputs, stats, grads, optax.apply_updates(variables["params"], updates)

    loss, outputs, stats, grads, params = step(variables, nhwc(x), jnp.asarray(labels.numpy()))
    ours = {"outputs": list(outputs), "loss": float(loss),
            "grads": flax_to_torchvision({"params": grads}),
            "state": flax_to_torchvision({"params": params, "batch_stats": stats})}
    return ours, ref


def test_train_mode_outputs_equal_torchvision(train_step_pair):
    ours, ref = train_step_pair
    # Ours are (logits, aux1, aux2); torchvision's tuple is (logits, aux_logits2, aux_logits1), named.
    for a, b in zip(ours["outputs"], ref["outputs"]):
        assert rel(a, b) < FORWARD_RTOL
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # a mean of ~11: 1e-6 is float32 rounding


def test_batch_statistics_after_one_train_forward_equal_torch(train_step_pair, torchvision_state_dict):
    """torch momentum 0.1 is flax momentum 0.9, and the running variance takes the unbiased batch variance.

    Compared on the batch's own contribution, (new - 0.9 old) / 0.1, which the 0.9 * old term would otherwise
    hide: measured up to 2e-4 (the mean of conv1's output is a sum that cancels), so 1e-3. A biased running
    variance would be off by n / (n - 1): 1/31 on the aux heads' 4x4 maps at batch 2.
    """
    ours, ref = train_step_pair
    keys = [k for k in ref["state"] if k.endswith(("running_mean", "running_var"))]
    assert len(keys) == 2 * 59
    for k in keys:
        old = torchvision_state_dict[k].numpy()
        new_ours, new_ref = ours["state"][k].numpy(), ref["state"][k].numpy()
        assert rel(new_ours, new_ref) < 1e-4, k
        assert rel(new_ours - 0.9 * old, new_ref - 0.9 * old) < 1e-3, k


def test_gradients_and_sgd_step_equal_torch(train_step_pair, torchvision_state_dict):
    """Gradients of CE(main) + 0.3 (CE(aux1) + CE(aux2)) and the parameters after one torch.optim.SGD /
    optax.sgd step (lr 0.1, momentum 0.9).

    Tolerance: gradients through 57 training-mode BatchNorms are ill-conditioned in float32 (ReLU decisions
    that flip on a 1e-7 change of the input reroute gradient): torch's own float32 gradients differ from its
    float64 ones by 0.6% overall and ours by 0.9%, single tensors up to 4%. So 3% on the whole gradient, 10% on
    any one tensor: a wrong permutation, transpose, loss weight or missing term would be off by 30% to 100%.
    """
    ours, ref = train_step_pair
    assert set(ours["grads"]) == set(ref["grads"])
    flat = lambda d: np.concatenate([d[k].numpy().ravel() for k in sorted(ref["grads"])])  # noqa: E731
    assert rel(flat(ours["grads"]), flat(ref["grads"])) < 3e-2
    for k in ref["grads"]:
        assert rel(ours["grads"][k], ref["grads"][k]) < 1e-1, k
    # One step from a zero momentum buffer moves each weight by -lr * grad on both sides (to float32 rounding
    # of the weight, 1e-6); so the new weights differ across sides exactly as the gradients do.
    for k in ref["grads"]:
        old = torchvision_state_dict[k].numpy()
        for side in (ours, ref):
            np.testing.assert_allclose(side["state"][k].numpy(), old - LR * side["grads"][k].numpy(), rtol=1e-6,
                                       atol=1e-7 + 1e-6 * np.abs(old).max())
        assert rel(ours["state"][k].numpy() - old, ref["state"][k].numpy() - old) < 1e-1, k


# ----------------------------------------------------------------------------------------------- seed


@pytest.fixture(scope="module")
def writeup_pair():
    torch.manual_seed(0)
    torch_model = WriteupGoogLeNet()  # PyTorch's default init, as the write-up (1 channel, 10 classes)
    variables = torchvision_to_flax(torch_model.state_dict(), variant="seed")
    return torch_model, variables


def test_seed_variant_eval_equals_the_writeups_model(writeup_pair):
    torch_model, variables = writeup_pair
    x = torch.randn(2, 1, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = torch_model.eval()(x).numpy()
    model = GoogLeNet(VARIANTS["seed"], num_classes=10, in_channels=1)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc(x))
    assert rel(ours, ref) < FORWARD_RTOL


def test_seed_variant_training_sum_equals_the_writeups_model(writeup_pair):
    """The write-up's training-mode output is logits + 0.3 aux1 + 0.3 aux2 (dropout off on both sides)."""
    torch_model, variables = writeup_pair
    torch_model.train()
    torch_model.dropout.p = 0.0
    torch_model.aux1.dropout = torch_model.aux2.dropout = 0.0
    x = torch.randn(2, 1, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch_model(x).numpy()
    model = without_dropout("seed").clone(num_classes=10, in_channels=1)
    out = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, nhwc(x))
    assert rel(out.logits + 0.3 * out.aux1 + 0.3 * out.aux2, ref) < FORWARD_RTOL
