"""The convolution, pooling and normalisation kernels (jax_googlenet.ops) against torch's own functions: each
implementation's forward and gradients, with the thresholds at which the CPU path switches kernels crossed; and
the kernel plan (jax_googlenet.ops.plan): the kernel it chooses for every layer, that the model runs what it
chooses, and its command line."""

import fnmatch

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_googlenet import googlenet, ops, stage_sizes
from jax_googlenet.ops import __main__ as ops_main
from jax_googlenet.ops import conv2d, local_response_norm, max_pool, norm, plan, winograd

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # conftest.py: compiled for what it computes


def forward_and_grads(conv, x, w, g):
    """conv(x, w) and its input and kernel gradients for the cotangent g, jitted as one function (op-by-op
    dispatch would compile each of the transforms' ops apart)."""

    def run(x, w, g):
        y, vjp = jax.vjp(conv, x, w)
        return (y, *vjp(g))

    return jax.jit(run)(x, w, g)


def assert_conv_equals_torch(rng, batch: int, side: int, k: int, stride: int, pad: int, impl: str = "slices",
                             conv=None) -> None:
    """conv2d(impl=impl) (or `conv(x, w)`) against torch.nn.functional.conv2d in float64: forward, input and
    weight gradients for a random cotangent, to 1e-12."""
    x, w = rng.normal(size=(batch, side, side, 3)), rng.normal(size=(k, k, 3, 4))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).requires_grad_()
    yt = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad)
    g = rng.normal(size=yt.shape)
    yt.backward(torch.from_numpy(g))
    with jax.enable_x64(True):
        y, dx, dw = forward_and_grads(conv or (lambda a, b: conv2d(a, b, stride, pad, impl)), jnp.asarray(x),
                                      jnp.asarray(w), jnp.asarray(g).transpose(0, 2, 3, 1))
    np.testing.assert_allclose(y, yt.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, wt.grad.permute(2, 3, 1, 0).numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch, side", [(1, 9), (3, 17), (4, 16)])
def test_strided_convolution_and_its_gradients_equal_torchs_conv2d(batch, side):
    """The CPU path's strided convolution (conv1's 7x7/2: XLA's convolution and its autodiff backward; batches
    of 1, 3 and 4) against torch.nn.functional.conv2d, forward and both gradients, in float64."""
    assert_conv_equals_torch(np.random.default_rng(batch * side), batch, side, 7, 2, 3)


@pytest.mark.parametrize("side, k, pad", [(9, 3, 1), (3, 3, 1), (10, 5, 2), (8, 3, 0), (2, 3, 1),
                                          (12, 3, 1), (16, 5, 2), (30, 3, 0), (29, 3, 1)])
def test_slices_convolution_and_its_gradients_equal_torchs_conv2d(side, k, pad):
    """The CPU path's stride-1 k x k convolution (XLA's forward on maps of 8 and more, im2col below; in the
    backward, XLA's weight gradient on outputs 12 to 28 wide, dots otherwise) against
    torch.nn.functional.conv2d, forward and both gradients, in float64; the sides cross every threshold."""
    assert_conv_equals_torch(np.random.default_rng(side * k), 2, side, k, 1, pad)


@pytest.mark.parametrize("side, k, pad", [(1, 3, 1), (2, 3, 1), (3, 3, 1), (6, 3, 1), (12, 3, 1), (4, 5, 2),
                                          (9, 5, 2)])
def test_winograd_path_and_its_gradients_equal_torchs_conv2d(side, k, pad, monkeypatch):
    """impl="winograd": dense products on maps smaller than the kernel (1x1 and 2x2 for 3x3, 4x4 for 5x5),
    F(m x m, k x k) where plan.WINOGRAD's tiles divide the output (F4 on 12, F2 on 6), the slices path
    elsewhere (3, and 9 for 5x5); float64, to 1e-12. (The inputs' 3 channels pass WINOGRAD_MIN_CHANNELS here.)"""
    monkeypatch.setattr(plan, "WINOGRAD_MIN_CHANNELS", 3)
    assert_conv_equals_torch(np.random.default_rng(side * k + pad), 2, side, k, 1, pad, "winograd")


@pytest.mark.parametrize("m, side", [(4, 8), (2, 6), (4, 7), (4, 3)])
def test_winograd_with_bias_and_relu_and_its_gradients_equal_torch(m, side):
    """Folded inference's Winograd kernel, relu(conv(x) + bias) with the bias and ReLU in the output transform,
    against torch.relu(conv2d(x, w, b)) in float64: forward and the gradients of x, the kernel and the bias, to
    1e-12 (the inputs' ReLU splits about half the outputs); on 7x7 and 3x3 maps with the last tiles padded."""
    rng = np.random.default_rng(m)
    x, w, b = rng.normal(size=(2, side, side, 3)), rng.normal(size=(3, 3, 3, 4)), rng.normal(size=4)
    xt, wt, bt = (torch.from_numpy(a).requires_grad_() for a in (x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), b))
    yt = torch.relu(torch.nn.functional.conv2d(xt, wt, bt, padding=1))
    g = rng.normal(size=yt.shape)
    yt.backward(torch.from_numpy(g))

    def run(x, w, b, g):
        y, vjp = jax.vjp(lambda x, w, b: winograd.conv_winograd_bias_relu(x, w, b, 1, m), x, w, b)
        return (y, *vjp(g))

    with jax.enable_x64(True):
        got = jax.jit(run)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), jnp.asarray(g.transpose(0, 2, 3, 1)))
    want = [yt.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
            wt.grad.numpy().transpose(2, 3, 1, 0), bt.grad.numpy()]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m, k, side, pad", [(2, 3, 9, 1), (4, 3, 13, 1), (6, 3, 10, 2), (2, 5, 10, 2), (4, 5, 5, 0)])
def test_winograd_tiles_and_their_gradients_equal_torchs_conv2d(m, k, side, pad):
    """F(m x m, k x k) alone over a batch of 3, with tiles that do not divide the output (a padded last tile);
    float64, to 1e-12."""
    assert_conv_equals_torch(np.random.default_rng(side * m + k), 3, side, k, 1, pad,
                             conv=lambda a, b: winograd.conv_winograd(a, b, pad, m))


def test_winograd_keeps_the_direct_convolution_in_bfloat16(monkeypatch):
    """In bfloat16 impl="winograd" runs the slices path, bit for bit: Winograd's transforms would multiply
    bfloat16's rounding error."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 20, 20, 3)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.bfloat16)
    monkeypatch.setattr(plan, "WINOGRAD_MIN_CHANNELS", 3)
    assert plan.winograd_tile(3, 20, 20, 3) is not None
    np.testing.assert_array_equal(np.asarray(conv2d(x, w, 1, 1, "winograd"), np.float32),
                                  np.asarray(conv2d(x, w, 1, 1, "slices"), np.float32))


# (output side, input channels, output channels) of some of the torchvision variant's 3x3 convolutions at 224
# that the plan sends to Winograd: conv3, inception 3a and 3b (F4), inception 4a and 4e (F2).
LAYERS_224 = [(56, 64, 192), (28, 96, 128), (28, 128, 192), (14, 96, 208), (14, 160, 320)]


@pytest.mark.parametrize("side, cin, cout", LAYERS_224)
def test_winograd_float32_error_on_the_networks_layer_shapes_is_bounded(side, cin, cout):
    """Relative error (Frobenius) of the float32 forward and both gradients against a float64 reference, on
    inputs like the network's (ReLU outputs, He-scaled kernel): at most 1e-5 (measured up to 3e-6 for
    F(4x4, 3x3); XLA's own float32 convolution 1e-6)."""
    assert plan.winograd_tile(3, side, side, cin) is not None
    rng = np.random.default_rng(side + cin)
    x = np.maximum(rng.normal(size=(1, side, side, cin)), 0)
    w = rng.normal(size=(3, 3, cin, cout)) * np.sqrt(2 / (9 * cin))
    g = rng.normal(size=(1, side, side, cout))
    ref = torch.nn.functional.conv2d
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).requires_grad_()
    yt = ref(xt, wt, padding=1)
    yt.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    want = [yt.detach().permute(0, 2, 3, 1).numpy(), xt.grad.permute(0, 2, 3, 1).numpy(),
            wt.grad.permute(2, 3, 1, 0).numpy()]
    got = forward_and_grads(lambda a, b: conv2d(a, b, 1, 1, "winograd"), jnp.asarray(x, jnp.float32),
                            jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32))
    for name, a, b in zip(("forward", "input gradient", "kernel gradient"), got, want):
        error = np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)
        assert error < 1e-5, f"{name}: relative error {error:.1e}"


@pytest.mark.parametrize("impl", ["slices", "xla"])
@pytest.mark.parametrize("side, stride, pad, ceil", [(11, 2, 0, True), (12, 2, 0, False), (9, 1, 1, True)])
def test_max_pool_and_its_gradient_equal_torch_with_ties(impl, side, stride, pad, ceil):
    """Values from {0, 1, 2} tie in almost every window: the gradient must go where torch sends it (the
    window's first maximum), forward and backward, for the strided stem pools and the inception pools."""
    rng = np.random.default_rng(side)
    x = rng.integers(0, 3, size=(2, side, side, 5)).astype(np.float32)
    # integer cotangents: sums are exact in any order, so only where each gradient goes can differ
    g = rng.integers(-8, 9, size=(2, 5, side, side)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, 3, stride, pad, ceil_mode=ceil)
    gt = torch.from_numpy(g[:, :, : yt.shape[2], : yt.shape[3]].copy())
    yt.backward(gt)
    y, vjp = jax.vjp(lambda v: max_pool(v, 3, stride, "ceil" if ceil else "floor", pad=pad, impl=impl),
                     jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(gt.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.asarray(dx), xt.grad.permute(0, 2, 3, 1).numpy())


def test_local_response_norm_equals_torch():
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 64)).astype(np.float32) * 10
    expected = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(local_response_norm(jnp.asarray(x)), expected.permute(0, 2, 3, 1).numpy(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_batch_norm_train_and_its_gradients_equal_torchs_batch_norm(dtype, tol):
    """batch_norm_train against torch.nn.functional.batch_norm(training=True): y, the batch mean and biased
    variance, and the gradients of x, scale and bias, with channel means 30x their spread (where a one-pass
    variance, E[x^2] - E[x]^2, loses digits) and a loss that also reads the statistics."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 6, 3)) * np.array([1.0, 0.1, 2.0]) + np.array([3.0, -3.0, 0.5])
    scale, bias = rng.normal(size=3), rng.normal(size=3)
    g, g_mean, g_var = rng.normal(size=x.shape), rng.normal(size=3), rng.normal(size=3)
    xt, st, bt = (torch.tensor(a, requires_grad=True) for a in (x.transpose(0, 3, 1, 2), scale, bias))
    yt = torch.nn.functional.batch_norm(xt, None, None, st, bt, training=True, eps=1e-3)
    mean_t, var_t = xt.mean((0, 2, 3)), xt.var((0, 2, 3), unbiased=False)
    loss = (yt * torch.from_numpy(g.transpose(0, 3, 1, 2))).sum() + (mean_t * torch.from_numpy(g_mean)).sum() + (
        var_t * torch.from_numpy(g_var)).sum()
    loss.backward()

    def run(x, scale, bias):
        y, mean, var = norm.batch_norm_train(x, scale, bias, 1e-3, x.dtype)
        return jnp.sum(y * g) + jnp.sum(mean * g_mean) + jnp.sum(var * g_var), (y, mean, var)

    with jax.enable_x64(True):
        args = [jnp.asarray(a, dtype) for a in (x, scale, bias)]
        (grads, (y, mean, var)) = jax.jit(jax.grad(run, (0, 1, 2), has_aux=True))(*args)
    expected = [(y, yt.detach().numpy().transpose(0, 2, 3, 1)), (mean, mean_t.detach().numpy()),
                (var, var_t.detach().numpy()), (grads[0], xt.grad.numpy().transpose(0, 2, 3, 1)),
                (grads[1], st.grad.numpy()), (grads[2], bt.grad.numpy())]
    for ours, theirs in expected:
        assert ours.dtype == dtype
        np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol)


def test_compiler_options_choose_xlas_own_dots_and_convolutions_from_64_pixels_in_float32():
    """On the CPU in float32 from 64-pixel images the steps compile with XLA's own dot and convolution kernels
    (`ops.compiler_options`), from 224 pixels with XLA's elemental loop emitters as well: conv1 (XLA's
    convolution) and a 1x1 convolution (a dot) compiled so are no YNNPACK fusion, and equal torch's conv2d as the
    default compile does. Below 64 pixels, in float64 and in bfloat16, no options."""
    assert ops.compiler_options(223) == ops.compiler_options(64) == ops.XLA_KERNELS
    assert ops.compiler_options(224) == {**ops.XLA_KERNELS, **ops.ELEMENTAL_EMITTERS}
    assert ops.compiler_options(63) == ops.compiler_options(224, "float64") == {}
    assert ops.compiler_options(224, jnp.bfloat16) == {}
    assert "XLA's own" in ops.xla_kernels(96) and "YNNPACK" in ops.xla_kernels(32)
    assert "elemental" in ops.xla_kernels(224) and "elemental" not in ops.xla_kernels(96)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    for w, stride, padding in ((rng.normal(size=(7, 7, 3, 64)), 2, 3), (rng.normal(size=(1, 1, 3, 16)), 1, 0)):
        w = w.astype(np.float32)
        ref = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                         torch.from_numpy(w).permute(3, 2, 0, 1), stride=stride,
                                         padding=padding).permute(0, 2, 3, 1).numpy()
        for options, ynn in ((ops.compiler_options(64), False), (ops.compiler_options(224), False), ({}, True)):
            f = jax.jit(lambda a, b: conv2d(a, b, stride, padding, "winograd"),
                        compiler_options=options).lower(x, w).compile()
            assert ("ynn_fusion" in f.as_text()) == ynn
            np.testing.assert_allclose(f(x, w), ref, rtol=1e-4, atol=1e-4)


def test_folded_inference_compiles_without_the_elemental_emitters(monkeypatch):
    """The folded eval step keeps XLA:CPU's fusion emitters at every size (`step="inference"`): at 16/224 they run
    it 4-18% faster than the elemental emitters the train step takes there, the same logits to the bit. The jobs
    and predict compile their folded steps so; the train steps keep the elemental emitters."""
    from experiments import finetune, inference, mnist, predict
    from jax_googlenet import fold, train

    assert ops.compiler_options(224, step="inference") == ops.XLA_KERNELS
    assert ops.compiler_options(96, step="inference") == ops.compiler_options(96)
    assert ops.compiler_options(32, step="inference") == ops.compiler_options(224, "float64", step="inference") == {}
    with pytest.raises(ValueError, match="step must be 'train' or 'inference'"):
        ops.compiler_options(224, step="eval")
    compiled = []
    monkeypatch.setattr(train, "jit_train_step", lambda options, **_: compiled.append(("train", options)))
    monkeypatch.setattr(inference, "jit_folded_eval_step",
                        lambda model, options, **_: compiled.append(("folded", options)))
    monkeypatch.setattr(inference, "Inference", lambda *a, **k: None)
    cfg = {"image_size": 224, "dtype": "float32", "freeze_backbone": False, "loss_mode": "paper",
           "label_smoothing": 0.0, "classes": ["a", "b"], "in_channels": 3, "max_shift": 0}
    finetune.make_steps(cfg, None, None, None)
    mnist.make_steps(cfg, None, None, None, None, images=0, recalibration_batches=None, lead=True)
    inference_options = ops.compiler_options(224, step="inference")
    assert compiled == [("train", ops.compiler_options(224)), ("folded", inference_options)] * 2
    captured = {}
    monkeypatch.setattr(fold, "fold", lambda model, variables, image_shape: (model, variables))
    monkeypatch.setattr(jax, "jit", lambda fun, compiler_options=None: captured.setdefault("options",
                                                                                          compiler_options))
    predict.folded_step(googlenet("torchvision", num_classes=2), {"params": {}}, 224)
    assert captured["options"] == inference_options


# ----------------------------------------------------------------------------------------------- the plan

# The kernel of every layer of the torchvision variant (impl "auto" on the CPU, float32), "forward / backward",
# the layers as fnmatch patterns of the plan's names: recorded from the model before the choices moved into the
# plan, so the plan keeps every layer's kernel. Every layer matches exactly one pattern.
TRAIN_COMMON = {
    "xla conv / xla conv (autodiff)": "conv1",
    "dot / dots (autodiff)": "conv2 inception*/branch4_1 aux?/conv",
    "merged dot / dots (autodiff)": "inception*/branch1+branch2_0+branch3_0",
    "shifted slices / first-max spread": "maxpool?",
    "shifted slices / first-max shifted views": "inception*/branch4_0",
}
EVAL_COMMON = {"xla conv": "conv1", "dot": "conv2 inception*/branch1 inception*/branch[23]_0 inception*/branch4_1",
               "shifted slices": "maxpool? inception*/branch4_0"}
F4, F2 = "winograd F(4x4,3x3)", "winograd F(2x2,3x3)"
XLA_KXK = "xla conv / xla weight grad + shifted-view input grad"
IM2COL_KXK = "im2col dot / im2col weight grad + shifted-view input grad"
TODAY = {
    (16, 224): {f"{F4} / {F4}": "conv3 inception3?/branch2_1", f"{F2} / {F2}": "inception4?/branch2_1",
                XLA_KXK: "inception3?/branch3_1 inception4?/branch3_1", IM2COL_KXK: "inception5?/branch[23]_1"},
    (64, 96): {f"{F4} / {F4}": "conv3 inception3?/branch2_1", f"{F2} / {F2}": "inception4?/branch2_1",
               XLA_KXK: "inception3?/branch3_1", IM2COL_KXK: "inception4?/branch3_1 inception5?/branch[23]_1"},
    (64, 32): {f"{F4} / {F4}": "conv3 inception3?/branch2_1", IM2COL_KXK: "inception3?/branch3_1",
               "dense product / dots (autodiff)": "inception4?/branch[23]_1 inception5?/branch[23]_1"},
}
PLAN_CASES = [pytest.param(16, 224, marks=pytest.mark.slow), pytest.param(64, 96, marks=pytest.mark.slow), (64, 32)]


def kernels_run(jaxpr) -> list[str]:
    """The kernels a traced forward runs, in order, read off its jaxpr: each custom VJP by its backward's name
    (`_conv_kxk_bwd` with the kind of its forward, `_winograd_bwd` with its tile), XLA's convolutions,
    reduce_window max pools and dots."""
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "custom_vjp_call":
            bwd, inner = eqn.params["bwd"].f.__name__, eqn.params["call_jaxpr"].jaxpr
            prims = {e.primitive.name: e for e in inner.eqns}
            if bwd == "_conv_kxk_bwd":
                bwd += " xla" if "conv_general_dilated" in prims else " im2col"
            if bwd == "_winograd_bwd":  # F(m x m, 3x3) multiplies at (m + 2)^2 positions
                bwd += f" {int(prims['dot_general'].invars[0].aval.shape[0] ** 0.5) - 2}"
            found.append(bwd)
        elif name in ("conv_general_dilated", "reduce_window_max", "dot_general"):
            found.append(name)
        else:
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        found += kernels_run(sub)
    return found


@pytest.fixture(scope="module")
def traced_plans():
    """{(batch, side, mode): (the plan's rows, the kernels the traced forward runs)}, each traced once."""
    cache = {}

    def trace(batch, side, mode):
        if (batch, side, mode) not in cache:
            model = googlenet(num_classes=10)
            x = jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32)
            variables = jax.eval_shape(model.init, jax.random.key(0), x)
            with plan.recording() as rows:
                jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=mode == "train", mutable=["batch_stats"],
                                                                rngs={"dropout": jax.random.key(0)}))(variables, x)
            cache[batch, side, mode] = rows, kernels_run(jaxpr.jaxpr)
        return cache[batch, side, mode]

    return trace


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("batch, side", PLAN_CASES)
def test_the_plan_chooses_todays_kernel_for_every_layer(traced_plans, batch, side, mode):
    """Every conv and max pool of the train step and of the eval forward at 16/224, 64/96 and 64/32 gets the
    kernel in TODAY (forward and, in training, backward); `network_plan` gives the same rows."""
    rows, _ = traced_plans(batch, side, mode)
    want = dict(TRAIN_COMMON)
    if mode == "eval":  # the forward alone, and the 1x1 convolutions each on its own
        want = dict(EVAL_COMMON)
    for label, patterns in TODAY[batch, side].items():
        label = label.split(" / ")[0] if mode == "eval" else label
        want[label] = f"{want.get(label, '')} {patterns}"
    assert len(rows) == (54 if mode == "train" else 70)
    matched = set()
    for row in rows:
        labels = [label for label, patterns in want.items()
                  if any(fnmatch.fnmatchcase(row.name, p) for p in patterns.split())]
        got = row.forward if mode == "eval" else f"{row.forward} / {row.backward}"
        assert labels == [got], f"{row.name}: {got}, expected {labels}"
        matched.add(got)
    assert matched == set(want)
    assert plan.network_plan(side, batch, mode=mode) == rows
    if (side, mode) == (224, "train"):  # the layers whose float32 error test_winograd_float32_error... bounds
        winograd = {(r.shape[1], r.shape[3]) for r in rows if r.forward.startswith("winograd")}
        assert {(side, cin) for side, cin, _ in LAYERS_224} <= winograd


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("batch, side", PLAN_CASES)
def test_the_model_runs_the_kernels_the_plan_lists(traced_plans, batch, side, mode):
    """The kernels in the traced forward's jaxpr, in order, are the plan's rows' kernels: custom VJPs by their
    backward's name, XLA's primitives by theirs. Dots are counted: the plan's 1x1, merged and dense products
    plus the classifiers' (fc; in training each aux head's fc1, fc2 and, where its input's side does not divide the
    pooled grid's 4, the adaptive pool's two: at 32 and 64 pixels the head computes on its input's 2x2 or 4x4)."""
    rows, run = traced_plans(batch, side, mode)
    as_run = {"xla conv": "conv_general_dilated", "reduce_window": "reduce_window_max",
              "shifted slices": "_window_max_bwd", F4: "_winograd_bwd 4", F2: "_winograd_bwd 2",
              "dot": "dot_general", "merged dot": "dot_general", "dense product": "dot_general",
              "im2col dot": "_conv_kxk_bwd im2col"}
    expected = [as_run[r.forward] for r in rows]
    # a stride-1 k x k convolution with XLA's forward runs inside conv_kxk's custom VJP
    expected = [("_conv_kxk_bwd xla" if r.forward == "xla conv" and r.backward.startswith(("xla weight", "-"))
                 and r.op.startswith("conv 3x3/1") else e) for r, e in zip(rows, expected)]
    not_dots = lambda names: [n for n in names if n not in ("dot_general", "_batch_norm_bwd")]  # noqa: E731
    assert not_dots(run) == not_dots(expected)
    pooled = 4 % stage_sizes("torchvision", side)["inception4a"] != 0
    classifiers = 1 + (2 * (4 if pooled else 2) if mode == "train" else 0)
    assert run.count("dot_general") == expected.count("dot_general") + classifiers


def test_the_plan_prints_each_layers_kernels(capsys):
    """`python -m jax_googlenet.ops --eval` prints the options the step compiles with and one line per layer."""
    assert ops_main.main(["--image-size", "32", "--batch-size", "8", "--eval"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "torchvision, 8 x 32 x 32, eval, float32, impl 'auto' = 'winograd' on cpu"
    assert out[1].startswith("compiled with {}: XLA:CPU's default")
    assert out[2].split() == ["layer", "input", "(NHWC)", "op", "forward", "backward"]
    assert out[6].split() == ["conv3", "8x8x8x64", "conv", "3x3/1", "->", "192", "winograd", "F(4x4,3x3)", "-"]
    assert len(out) == 3 + 70


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "14"], "--image-size 14: the 'torchvision' variant with aux heads takes at least 15 pixels"),
    (["--backend", "tpu"], "argument --backend: invalid choice: 'tpu'"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--image-size", "big"], "argument --image-size: invalid int value: 'big'"),
])
def test_the_plans_command_refuses_a_bad_flag_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        ops_main.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"python -m jax_googlenet.ops: error: {message}")


def test_the_folded_plan_fuses_bias_and_relu_into_winograds_output_transform():
    """In folded inference every conv adds its bias and applies the ReLU: in Winograd's output transform where
    the layer gets Winograd, after the product elsewhere; the kernels are eval's."""
    folded = plan.network_plan(32, 4, mode="folded")
    evaluated = plan.network_plan(32, 4, mode="eval")
    assert [r.name for r in folded] == [r.name for r in evaluated]
    for f, e in zip(folded, evaluated):
        if f.kind == "pool":
            assert f.forward == e.forward
        elif e.forward.startswith("winograd"):
            assert f.forward == f"{e.forward} + bias, ReLU in its output transform"
        else:
            assert f.forward == f"{e.forward}; bias, ReLU after"


def test_the_plan_for_the_gpu_is_xlas_kernels_and_no_options():
    """On the GPU, impl "auto" is "xla": XLA's convolution and reduce_window for every layer, no options."""
    rows = plan.network_plan(32, 2, mode="train", backend="gpu")
    assert {(r.forward, r.backward) for r in rows} == {("xla conv", "xla conv (autodiff)"),
                                                       ("reduce_window", "reduce_window (autodiff)")}
    assert plan.compiler_options(224, backend="gpu") == {}


def test_folded_inference_runs_a_few_images_at_a_time_on_the_cpu():
    """`plan.eval_chunk`: chunks of about EVAL_CHUNK_PIXELS input pixels on the CPU (4 images at 224, 16 at 96,
    the whole batch at 32, where smaller chunks ran slower), the whole batch on a GPU."""
    assert plan.eval_chunk(16, 224, 224, "cpu") == 4
    assert plan.eval_chunk(64, 96, 96, "cpu") == 16
    assert plan.eval_chunk(64, 32, 32, "cpu") == 64
    assert plan.eval_chunk(1, 224, 224, "cpu") == 1
    assert plan.eval_chunk(3, 600, 600, "cpu") == 1
    assert plan.eval_chunk(256, 224, 224, "gpu") == 256


def test_folded_inference_runs_the_inception_stages_on_more_images_at_a_time():
    """The stages after the stem (`part="after_stem"`, sized by the stem's output map) run in chunks of about
    EVAL_AFTER_STEM_POSITIONS positions: the whole batch at 16/224 and 64/96, 16 images of 28 x 28 at 64/224,
    the whole batch on a GPU."""
    assert plan.eval_chunk(16, 28, 28, "cpu", part="after_stem") == 16
    assert plan.eval_chunk(64, 12, 12, "cpu", part="after_stem") == 64
    assert plan.eval_chunk(64, 28, 28, "cpu", part="after_stem") == 16
    assert plan.eval_chunk(256, 28, 28, "gpu", part="after_stem") == 256
    with pytest.raises(ValueError, match="part"):
        plan.eval_chunk(16, 28, 28, "cpu", part="body")


def test_recalibrations_forward_keeps_each_1x1_convolution_with_its_own_batch_norm():
    """The train step merges an inception block's three 1x1 convolutions (one product, one BatchNorm); inside
    `plan.separate_1x1` (the recalibration's forward, which reads each BatchNorm's input) none is merged."""
    merged = [r for r in plan.network_plan(32, 2) if r.forward == "merged dot"]
    assert len(merged) == 9
    with plan.separate_1x1():
        assert not [r for r in plan.network_plan(32, 2) if r.forward == "merged dot"]
