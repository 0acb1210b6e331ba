"""Numerical parity with PyTorch: torchvision 0.29's GoogLeNet (and the write-up's model for the writeup variant) and
ours, with the same weights (converted by `convert`), the same inputs: forward outputs in float32 at the highest
precision on both sides, gradients and SGD steps in float64 on both sides.

Tolerances are relative errors ||ours - torch|| / ||torch||, the tightest that pass reliably; each says why.
"""

import dataclasses
import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import torchvision

from convert import flax_to_torchvision, torchvision_to_flax
from jax_googlenet.model import VARIANTS, GoogLeNet, InceptionAux
from jax_googlenet.ops import compiler_options
from jax_googlenet.train import classification_loss, make_optimizer
from writeup_model import GoogLeNet as WriteupGoogLeNet

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # conftest.py: compiled for what it computes

# Forward outputs: 22 float32 layers (summation order differs between XLA and torch's CPU kernels) give
# 1e-7..2e-5 measured; 1e-4 is the project's parity bound (README, "Parity with PyTorch"), met with a 5x margin.
FORWARD_RTOL = 1e-4
LR, MOMENTUM = 0.1, 0.9


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def without_dropout(variant: str, **kw) -> GoogLeNet:
    return GoogLeNet(dataclasses.replace(VARIANTS[variant], dropout=0.0, aux_dropout=0.0), **kw)


def torch_googlenet(state_dict, **kw) -> torch.nn.Module:
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, dropout=0.0,
                                         dropout_aux=0.0, **kw)
    model.load_state_dict(state_dict, strict=True)
    return model


# ----------------------------------------------------------------------------------------------- eval


SLOW = pytest.mark.slow  # 15-30 s each on 2 CPU cores; (97, 1) is the quick subset's parity check


@pytest.mark.parametrize("side, batch, transform_input, impl", [
    pytest.param(224, 2, False, "auto", marks=SLOW), pytest.param(224, 2, True, "auto", marks=SLOW),
    pytest.param(225, 2, False, "auto", marks=SLOW), (97, 1, True, "auto"),
    # "auto" is "winograd" on the CPU; "xla" (the GPU's) at an odd size, ceil-mode pools
    pytest.param(225, 2, False, "xla", marks=SLOW),
])
def test_eval_logits_equal_torchvision(torchvision_state_dict, variables, side, batch, transform_input, impl):
    torch_model = torch_googlenet(torchvision_state_dict, transform_input=transform_input).eval()
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(side))
    with torch.no_grad():
        ref = torch_model(x).numpy()
    model = GoogLeNet(VARIANTS["torchvision"], transform_input=transform_input, impl=impl)
    # compiled as the jobs compile it for this size (`ops.compiler_options`: XLA's own dots and convolutions from 64 px)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False),
                   compiler_options=compiler_options(side))(variables, nhwc(x))
    assert ours.shape == ref.shape
    assert rel(ours, ref) < FORWARD_RTOL


# ----------------------------------------------------------------------------------------------- training


def aux_weighted_loss(out, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, labels) + 0.3 * (F.cross_entropy(out.aux_logits1, labels)
                                                         + F.cross_entropy(out.aux_logits2, labels))


@pytest.fixture(scope="module")
def train_forward_pair(torchvision_state_dict, variables):
    """One training-mode forward in float32 on both sides, dropout off, batch 2 at 224."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 917])
    torch_model = torch_googlenet(torchvision_state_dict).train()
    with torch.no_grad():
        out = torch_model(x)
    # torchvision's tuple is (logits, aux_logits2, aux_logits1); ours is (logits, aux1, aux2).
    ref = {"outputs": [t.numpy() for t in (out.logits, out.aux_logits1, out.aux_logits2)],
           "loss": aux_weighted_loss(out, labels).item(), "state": torch_model.state_dict()}

    model = without_dropout("torchvision")

    @functools.partial(jax.jit, compiler_options=compiler_options(224))
    def forward(variables, images, labels):
        outputs, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return outputs, classification_loss(outputs, labels, "paper"), updates["batch_stats"]

    outputs, loss, stats = forward(variables, nhwc(x), jnp.asarray(labels.numpy()))
    ours = {"outputs": list(outputs), "loss": float(loss),
            "state": flax_to_torchvision({"params": variables["params"], "batch_stats": stats})}
    return ours, ref


@pytest.mark.slow
def test_train_mode_outputs_equal_torchvision(train_forward_pair):
    ours, ref = train_forward_pair
    for a, b in zip(ours["outputs"], ref["outputs"]):
        assert rel(a, b) < FORWARD_RTOL
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # a mean of ~11: 1e-6 is float32 rounding


@pytest.mark.slow
def test_batch_statistics_after_one_train_forward_equal_torch(train_forward_pair, torchvision_state_dict):
    """torch momentum 0.1 is flax momentum 0.9, and the running variance takes the unbiased batch variance.

    Compared on the batch's own contribution, (new - 0.9 old) / 0.1, which the 0.9 * old term would otherwise
    hide: measured up to 2e-4 (the mean of conv1's output is a sum that cancels), so 1e-3. A biased running
    variance would be off by n / (n - 1): 1/31 on the aux heads' 4x4 maps at batch 2.
    """
    ours, ref = train_forward_pair
    keys = [k for k in ref["state"] if k.endswith(("running_mean", "running_var"))]
    assert len(keys) == 2 * 59
    for k in keys:
        old = torchvision_state_dict[k].numpy()
        new_ours, new_ref = ours["state"][k].numpy(), ref["state"][k].numpy()
        assert rel(new_ours, new_ref) < 1e-4, k
        assert rel(new_ours - 0.9 * old, new_ref - 0.9 * old) < 1e-3, k


# Gradients are compared in float64 on both sides. In float32 they are ill-conditioned, on both sides alike:
# through 57 training-mode BatchNorms a ReLU that flips on a 1e-7 change of its input reroutes gradient, so
# torch's own float32 gradients differ from its float64 ones by 0.6% overall and single tensors by up to 4%; a
# float32 comparison could only bound them at a few percent. float64 runs the same code, agreeing to 4e-11.
STEP_BATCHES = [(1, [3, 917]), (2, [42, 500])]  # (seed of the images, labels) of each step
# Per step: step 2 runs on parameters that already differ by step 1's rounding, which its gradients amplify.
OUTPUT_RTOL_F64 = (1e-12, 1e-11)
GRAD_RTOL_F64 = (1e-11, 3e-10)


def step_images(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def as_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    # Compared in numpy: thousands of small multithreaded torch ops crawl on a loaded CPU.
    return {k: v.detach().numpy().astype(np.float64) for k, v in tensors.items()}


@pytest.fixture(scope="module")
def torch_sgd_steps(torchvision_state_dict):
    """torch in float64: two torch.optim.SGD(lr 0.1, momentum 0.9) steps on CE + 0.3 (CE aux1 + CE aux2)."""
    torch_model = torch_googlenet(torchvision_state_dict).double().train()
    sgd = torch.optim.SGD(torch_model.parameters(), lr=LR, momentum=MOMENTUM)
    steps = []
    for seed, labels in STEP_BATCHES:
        sgd.zero_grad()
        out = torch_model(step_images(seed))
        loss = aux_weighted_loss(out, torch.tensor(labels))
        loss.backward()
        steps.append({"outputs": [t.detach().numpy() for t in (out.logits, out.aux_logits1, out.aux_logits2)],
                      "loss": loss.item(), "grads": as_numpy({k: p.grad for k, p in torch_model.named_parameters()})})
        sgd.step()
        steps[-1]["state"] = as_numpy(torch_model.state_dict())
    return steps


@pytest.fixture(scope="module", params=["auto", "xla"])
def sgd_steps_pair(request, torch_sgd_steps, variables):
    """The same two steps in float64 with `make_optimizer` (optax.sgd), for each impl ("auto" is "winograd" on
    the CPU). x64 is enabled only inside this fixture, so no other test sees it."""
    model = without_dropout("torchvision", dtype=jnp.float64, param_dtype=jnp.float64, impl=request.param)
    tx = make_optimizer(LR, momentum=MOMENTUM)

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                           mutable=["batch_stats"])
            return classification_loss(outputs, labels, "paper"), (outputs, updates["batch_stats"])

        (loss, (outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return loss, outputs, grads, optax.apply_updates(params, updates), batch_stats, opt_state

    steps = []
    with jax.enable_x64(True):
        # float32 weights widen exactly, as torch's .double() widens them.
        v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        params, batch_stats, opt_state = v["params"], v["batch_stats"], tx.init(v["params"])
        for seed, labels in STEP_BATCHES:
            loss, outputs, grads, params, batch_stats, opt_state = step(params, batch_stats, opt_state,
                                                                        nhwc(step_images(seed)), jnp.asarray(labels))
            assert outputs.logits.dtype == grads["fc"]["kernel"].dtype == jnp.float64
            steps.append({"outputs": [np.asarray(o) for o in outputs], "loss": float(loss),
                          "grads": as_numpy(flax_to_torchvision({"params": grads})),
                          "state": as_numpy(flax_to_torchvision({"params": params, "batch_stats": batch_stats}))})
    return steps, torch_sgd_steps


@pytest.mark.slow
def test_float64_train_outputs_loss_and_batch_statistics_equal_torch(sgd_steps_pair):
    """Both steps' (logits, aux1, aux2), loss, and running statistics after each step, in float64.

    Measured: step 1 up to 5e-14, step 2 up to 1.2e-12 (its logits; loss and statistics 1e-13), float64
    rounding through 22 layers; so 1e-12 and 1e-11.
    """
    ours, ref = sgd_steps_pair
    for a, b, rtol in zip(ours, ref, OUTPUT_RTOL_F64):
        for o, r in zip(a["outputs"], b["outputs"]):
            assert rel(o, r) < rtol
        assert a["loss"] == pytest.approx(b["loss"], rel=rtol)
        for k in b["state"]:
            if k.endswith(("running_mean", "running_var")):
                assert rel(a["state"][k], b["state"][k]) < rtol, k


@pytest.mark.slow
def test_float64_gradients_and_two_sgd_momentum_steps_equal_torch(sgd_steps_pair, torchvision_state_dict):
    """Gradients of CE(main) + 0.3 (CE(aux1) + CE(aux2)) at both steps, and each step's parameter change, for
    torch.optim.SGD and make_optimizer (optax.sgd), lr 0.1, momentum 0.9, per tensor, in float64.

    The first step moves each weight by -lr g1, the second by -lr (0.9 g1 + g2): momentum at work. Measured per
    tensor up to 7e-13 at step 1 and 3.6e-11 at step 2 (small gradients of late BatchNorm weights, sums of
    cancelling terms); so 1e-11 and 3e-10. A wrong permutation, transpose, loss weight, missing term or
    momentum rule is off by 1e-3 to 1.
    """
    ours, ref = sgd_steps_pair
    before = [as_numpy(torchvision_state_dict), ref[0]["state"]]
    for a, b, old, rtol in zip(ours, ref, before, GRAD_RTOL_F64):
        assert set(a["grads"]) == set(b["grads"]) and len(b["grads"]) == 187  # every parameter tensor
        for k in b["grads"]:
            assert rel(a["grads"][k], b["grads"][k]) < rtol, k
            assert rel(a["state"][k] - old[k], b["state"][k] - old[k]) < rtol, k
    # Momentum is no small term here: without it step 2 would move every tensor 25% or more differently.
    g2, move2 = ref[1]["grads"], {k: ref[1]["state"][k] - ref[0]["state"][k] for k in ref[1]["grads"]}
    assert min(rel(-LR * g2[k], move2[k]) for k in g2) > 0.1


# ----------------------------------------------------------------------------------------------- aux head


@pytest.mark.parametrize("side", [1, 2, 3, 4, 14])
def test_aux_head_training_equals_torchvisions_on_every_input_side(torchvision_state_dict, variables, side):
    """The aux head alone (aux1, converted weights) in training mode against torchvision's own InceptionAux, in
    float64, on the 4a maps of 16, 32, 48, 64 and 224-pixel inputs: outputs, running statistics, and gradients
    of a random projection of the outputs with respect to the input and every parameter. Where the side divides
    the pooled grid's 4 ours computes on the input's map (`layers.RepeatedGridDense`, BatchNorm's `repeats`),
    elsewhere through the adaptive pool. Measured up to 3e-15; the running variance without the repeat count
    in its n / (n - 1) is off by 5e-4 at side 2 and 3e-3 at side 1."""
    torch_model = torch_googlenet(torchvision_state_dict).double().train()
    head = torch_model.aux1
    x = torch.randn(2, 512, side, side, generator=torch.Generator().manual_seed(side), dtype=torch.float64,
                    requires_grad=True)
    r = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = head(x)
    (out * r).sum().backward()
    ref = {"out": out.detach().numpy(), "x": x.grad.numpy(),
           **{f"aux1.{k}": v for k, v in as_numpy({k: p.grad for k, p in head.named_parameters()}).items()}}
    ref_stats = as_numpy({f"aux1.{k}": v for k, v in head.state_dict().items() if k.endswith(("_mean", "_var"))})

    v = dataclasses.replace(VARIANTS["torchvision"], aux_dropout=0.0)
    ours_head = InceptionAux(1000, v, dtype=jnp.float64, param_dtype=jnp.float64)
    with jax.enable_x64(True):
        params, stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                     (variables["params"]["aux1"], variables["batch_stats"]["aux1"]))

        def loss(params, x):
            y, updates = ours_head.apply({"params": params, "batch_stats": stats}, x, train=True,
                                         mutable=["batch_stats"])
            return jnp.sum(y * jnp.asarray(r.numpy())), (y, updates["batch_stats"])

        (_, (y, new_stats)), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
            params, jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1)))
        as_torch = lambda tree: as_numpy(flax_to_torchvision(tree))  # noqa: E731
        ours = {"out": np.asarray(y), "x": np.asarray(g_x).transpose(0, 3, 1, 2),
                **as_torch({"params": {"aux1": g_params}})}
        ours_stats = {k: v for k, v in as_torch({"params": {"aux1": params}, "batch_stats": {"aux1": new_stats}})
                      .items() if k.endswith(("_mean", "_var"))}
    assert set(ours) == set(ref) and set(ours_stats) == set(ref_stats)
    for k in ref:
        assert rel(ours[k], ref[k]) < 1e-13, k
    for k in ref_stats:
        assert rel(ours_stats[k], ref_stats[k]) < 1e-13, k


# ----------------------------------------------------------------------------------------------- writeup


@pytest.fixture(scope="module")
def writeup_pair():
    torch.manual_seed(0)
    torch_model = WriteupGoogLeNet()  # PyTorch's default init, as the write-up (1 channel, 10 classes)
    variables = torchvision_to_flax(torch_model.state_dict(), variant="writeup")
    return torch_model, variables


def test_writeup_variant_eval_equals_the_writeups_model(writeup_pair):
    torch_model, variables = writeup_pair
    x = torch.randn(2, 1, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = torch_model.eval()(x).numpy()
    model = GoogLeNet(VARIANTS["writeup"], num_classes=10, in_channels=1)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc(x))
    assert rel(ours, ref) < FORWARD_RTOL


def test_writeup_variant_training_sum_equals_the_writeups_model(writeup_pair):
    """The write-up's training-mode output is logits + 0.3 aux1 + 0.3 aux2 (dropout off on both sides)."""
    torch_model, variables = writeup_pair
    torch_model.train()
    torch_model.dropout.p = 0.0
    torch_model.aux1.dropout = torch_model.aux2.dropout = 0.0
    x = torch.randn(2, 1, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch_model(x).numpy()
    model = without_dropout("writeup").clone(num_classes=10, in_channels=1)
    out = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, nhwc(x))
    assert rel(out.logits + 0.3 * out.aux1 + 0.3 * out.aux2, ref) < FORWARD_RTOL


# ----------------------------------------------------------------------------------------------- folded inference


@pytest.fixture(scope="module")
def unfolded_and_folded(variables, writeup_pair):
    """For each variant, (model, variables, input): torchvision's the stand-in weights (random BatchNorm
    statistics, so the fold is no identity) at 32 pixels (Winograd's F(4x4, 3x3) on 8 and 4, dense products
    on 2 and 1); paper and writeup (no BatchNorm: nothing to fold, the fused bias and ReLU kernels alone)
    random He-scaled weights at 32 and the write-up model's weights at its smallest side, 125."""
    paper = GoogLeNet(VARIANTS["paper"], aux_logits=False)
    rng = np.random.default_rng(0)  # He-scaled kernels, small biases: no initialiser to compile
    he = lambda a: rng.normal(size=a.shape) * (np.sqrt(2 / np.prod(a.shape[:-1])) if a.ndim > 1 else 0.1)  # noqa: E731
    paper_vars = jax.tree.map(lambda a: jnp.asarray(he(a), jnp.float32),
                              jax.eval_shape(paper.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    cases = {"torchvision": (GoogLeNet(VARIANTS["torchvision"]), variables, 32, 3),
             "paper": (paper, paper_vars, 32, 3),
             "writeup": (GoogLeNet(VARIANTS["writeup"], num_classes=10, in_channels=1), writeup_pair[1], 125, 1)}
    return {name: (model, v, jax.random.normal(jax.random.key(side), (2, side, side, channels)))
            for name, (model, v, side, channels) in cases.items()}


@pytest.mark.parametrize("variant", ["torchvision", "paper", "writeup"])
def test_folded_inference_equals_the_unfolded_model(unfolded_and_folded, variant):
    """`fold.fold` (the variables folded under jit, as a job folds them once outside its step) computes the
    unfolded model's train=False logits: measured up to 3e-7 relative (float32 rounding of the scaled kernels
    and of the changed summation order), bound 1e-5."""
    from jax_googlenet.fold import fold_batch_norm, folded, prepare
    from jax_googlenet.ops import plan

    model, v, x = unfolded_and_folded[variant]
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
    folded_model, folded_vars = folded(model), jax.jit(fold_batch_norm)(v)
    assert not jax.tree.leaves(folded_vars.get("batch_stats", {}))
    with plan.recording() as rows:
        got = jax.jit(lambda v, x: folded_model.apply(v, x, train=False))(folded_vars, x)
    assert {r.forward.split(" + ")[-1].split("; ")[-1] for r in rows if r.kind == "conv"} <= {
        "bias, ReLU after", "bias, ReLU in its output transform"}
    assert rel(got, ours) < 1e-5
    # with the kernels' weights prepared for this input size (`fold.prepare`), as the jobs, predict and the
    # benchmark run it: the same logits
    prepared = prepare(folded_model, folded_vars, x.shape[1:])
    assert rel(jax.jit(lambda v, x: folded_model.apply(v, x, train=False))(prepared, x), got) < 1e-6


# What a step may do to the weights alone: views and the bias's broadcast, which XLA fuses into their use.
VIEWS = {"reshape", "squeeze", "expand_dims", "slice", "broadcast_in_dim", "convert_element_type", "copy"}


def weight_only_ops(jaxpr, kinds) -> list[str]:
    """The operations of `jaxpr` (and its sub-jaxprs) other than VIEWS whose inputs are derived from the weights
    alone: `kinds` says per input "x" (the images), "w" (weights) or "c" (a constant)."""
    env, found = dict(zip(jaxpr.invars, kinds)), []
    for eqn in jaxpr.eqns:
        ins = [env.get(v, "c") if isinstance(v, jex.core.Var) else "c" for v in eqn.invars]
        kind = "x" if "x" in ins else ("w" if "w" in ins else "c")
        subs = [p for p in eqn.params.values() if isinstance(p, (jex.core.Jaxpr, jex.core.ClosedJaxpr))]
        if subs:
            for sub in subs:
                found += weight_only_ops(getattr(sub, "jaxpr", sub), ins)
        elif kind == "w" and eqn.primitive.name not in VIEWS:
            found.append(eqn.primitive.name)
        env.update((o, kind) for o in eqn.outvars)
    return found


def test_prepared_folded_step_computes_nothing_from_the_weights_alone(unfolded_and_folded):
    """`fold(model, variables, image_shape)` prepares the kernels' weight transforms (Winograd's G g G^T, the 2x2
    and 1x1 maps' dense operators) once: the step that applies them holds no operation on the weights alone
    beyond views (computed in the step, the transforms were 30% of the 64/32 eval step's kernel time). Without
    the image shape the transforms are in the step."""
    from jax_googlenet.fold import fold

    model, v, x = unfolded_and_folded["torchvision"]
    for image_shape, expect_transforms in ((None, True), (x.shape[1:], False)):
        folded_model, folded_vars = fold(model, v, image_shape)
        closed = jax.make_jaxpr(lambda v, x: folded_model.apply(v, x, train=False))(folded_vars, x)
        found = weight_only_ops(closed.jaxpr, ["w"] * len(jax.tree.leaves(folded_vars)) + ["x"])
        assert bool(found) == expect_transforms, found


def test_folded_apply_in_chunks_is_the_whole_batchs(unfolded_and_folded):
    """`fold.apply` computes the stem and the stages after it in chunks one after another (`plan.eval_chunk`),
    the last ones padded: 5 images, the stem in chunks of 2 and the stages after it in chunks of 4 (and of 5,
    the default at this size), give the logits and the input gradient of one call on all 5, within float
    rounding (measured 0 here: each image's arithmetic is the same)."""
    from jax_googlenet import fold as fold_ops

    model, v, _ = unfolded_and_folded["torchvision"]
    x = jax.random.normal(jax.random.key(5), (5, 32, 32, 3))
    folded_model, folded_vars = fold_ops.fold(model, v, x.shape[1:])
    whole = lambda v, x: folded_model.apply(v, x, train=False)  # noqa: E731
    for after_stem in (4, None):
        chunked = functools.partial(fold_ops.apply, folded_model, chunk=2, after_stem_chunk=after_stem)
        assert rel(jax.jit(chunked)(folded_vars, x), jax.jit(whole)(folded_vars, x)) < 1e-6
    grads = [jax.jit(jax.grad(lambda x, f=f: f(folded_vars, x)[:, 3].sum()))(x) for f in (chunked, whole)]
    assert rel(*grads) < 1e-6


def test_folded_apply_chunks_the_stem_alone_at_96_pixels():
    """At 32 x 96 x 96 the stem runs in two chunks of 16 images (`plan.eval_chunk`) and the stages after it on
    all 32 at once: one loop in the step, over the stem (traced only: nothing is compiled)."""
    from jax_googlenet import fold as fold_ops

    model = GoogLeNet(VARIANTS["torchvision"], aux_logits=False)
    x = jax.ShapeDtypeStruct((32, 96, 96, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: fold_ops.fold_batch_norm(model.init(jax.random.key(0), x)), x)
    closed = jax.make_jaxpr(functools.partial(fold_ops.apply, fold_ops.folded(model)))(variables, x)
    loops = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in loops] == [2]
    assert loops[0].outvars[0].aval.shape == (2, 16, 12, 12, 192)  # the stem's output, chunk by chunk


def test_prepared_weights_refuse_another_image_size(unfolded_and_folded):
    """Weights prepared for 32-pixel inputs applied to 64-pixel ones (other Winograd tiles, other dense
    operators): a ValueError that says so, not a silent recomputation or a shape error deep in a kernel."""
    from jax_googlenet.fold import fold

    model, v, x = unfolded_and_folded["torchvision"]
    folded_model, folded_vars = fold(model, v, x.shape[1:])
    with pytest.raises(ValueError, match="prepared weights are for inputs of another size"):
        jax.eval_shape(lambda v, x: folded_model.apply(v, x, train=False), folded_vars, jnp.zeros((1, 64, 64, 3)))


@pytest.mark.slow
def test_folded_inference_is_differentiable_in_its_input(unfolded_and_folded):
    """The folded model's gradient with respect to its input (saliency, adversarial inputs) equals the unfolded
    model's, in float64 (in float32 a ReLU or max pool that flips on a 1e-7 change reroutes gradient, as in the
    training parity tests): measured 5e-15 relative, bound 1e-12."""
    from jax_googlenet.fold import fold

    model, v, x = unfolded_and_folded["torchvision"]
    with jax.enable_x64(True):
        model = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        v, x = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (v, x))
        grad = lambda m, v: jax.jit(jax.grad(lambda x: m.apply(v, x, train=False).sum()))(x)  # noqa: E731
        want = grad(model, v)
        for image_shape in (None, x.shape[1:]):  # the weights' transforms in the step, and prepared
            folded_model, folded_vars = fold(model, v, image_shape)
            assert rel(grad(folded_model, folded_vars), want) < 1e-12
