"""The Flax GoogLeNet against torchvision's own googlenet: sizes, structure, modes and dtypes."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

from jax_googlenet import GoogLeNetOutputs, accepted_sides, googlenet, stage_sizes, train

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # conftest.py: compiled for what it computes

KEY = jax.random.key(0)


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init(model, side=224, channels=3, **kw):
    """Variables' shapes without computing anything."""
    return jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, side, side, channels)), **kw))


def torch_stage_shapes(side: int) -> dict[str, tuple[int, ...]]:
    """NHWC output shape of each named torchvision stage, from forward hooks on torchvision's model."""
    model = torchvision.models.googlenet(init_weights=False, aux_logits=False).eval()
    shapes = {}
    names = {"maxpool2": "stem", "avgpool": "pre_logits"}
    for name, module in model.named_children():
        if name.startswith("inception") or name in names:
            def hook(_m, _i, out, name=names.get(name, name)):
                n, c, h, w = out.shape
                shapes[name] = (n, h, w, c) if name != "pre_logits" else (n, c)
            module.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    return shapes


@pytest.mark.parametrize("aux", [True, False])
def test_parameter_count_equals_torchvision(aux):
    reference = torchvision.models.googlenet(init_weights=False, aux_logits=aux)
    expected = sum(p.numel() for p in reference.parameters())
    assert expected == (13_004_888 if aux else 6_624_904)
    variables = abstract_init(googlenet(aux_logits=aux), side=64)
    assert n_params(variables["params"]) == expected
    # BatchNorm running statistics: torchvision's buffers minus num_batches_tracked.
    stats = sum(b.numel() for n, b in reference.named_buffers() if "running" in n)
    assert n_params(variables["batch_stats"]) == stats


@pytest.mark.parametrize("side", [15, 16, 17, 31, 97, 224, 225])
def test_every_stage_shape_equals_torchvision(side):
    expected = torch_stage_shapes(side)
    model = googlenet(aux_logits=False)
    variables = abstract_init(model, side=side)
    got = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, side, side, 3)), method="features"), variables)
    assert {k: tuple(v.shape) for k, v in got.items()} == expected


def test_smallest_input_is_torchvisions_min_size():
    min_size = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.meta["min_size"]
    assert accepted_sides("torchvision", aux=True) == (min_size[0], None)
    # torchvision itself fails one pixel below, in the max pool after inception 3b (480 channels, 1x1)
    with pytest.raises(RuntimeError, match=r"Calculated output size: \(480x0x0\)\. Output size is too small"):
        torchvision.models.googlenet(init_weights=False).eval()(torch.zeros(1, 3, 14, 14))
    with pytest.raises(ValueError, match="accepts image sides of at least 15 pixels; got 14x14"):
        abstract_init(googlenet(), side=14)


@pytest.mark.parametrize("train", [None, False, True])
def test_init_creates_aux_heads_whatever_the_mode(train):
    kw = {} if train is None else {"train": train}
    variables = abstract_init(googlenet(), side=32, **kw)
    assert {"aux1", "aux2", "fc"} <= set(variables["params"])


def test_apply_without_train_flag_is_an_error(small):
    model, variables, x = small
    with pytest.raises(TypeError, match="train=True or train=False"):
        model.apply(variables, x)


@pytest.fixture(scope="module")
def small():
    """A 10-class, 1-channel torchvision-variant model at 32x32, as the MNIST job uses it."""
    model = googlenet(num_classes=10, in_channels=1)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 1))
    return model, jax.jit(model.init)(KEY, x), x


@pytest.fixture(scope="module")
def train_apply(small):
    model, _, _ = small
    return jax.jit(lambda v, x, rng: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                 rngs={"dropout": rng}))


@pytest.fixture(scope="module")
def eval_apply(small):
    model, _, _ = small
    return jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))


def test_eval_returns_logits_and_uses_running_statistics(small, eval_apply):
    model, variables, x = small
    logits, updated = eval_apply(variables, x)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert jax.tree.all(jax.tree.map(jnp.array_equal, updated["batch_stats"], variables["batch_stats"]))


def test_train_returns_three_heads_and_updates_batch_statistics(small, train_apply):
    model, variables, x = small
    out, updated = train_apply(variables, x, jax.random.key(2))
    assert isinstance(out, GoogLeNetOutputs)
    assert [o.shape for o in out] == [(4, 10)] * 3
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), updated["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))


def test_aux_heads_multiply_on_the_maps_the_adaptive_pool_repeats(small):
    """At 32 pixels the aux heads read 2x2 maps, which torch's adaptive pool repeats to 4x4: the train step's
    aux convolutions and fc1 products run on the 2x2 maps (fc1 on 2*2*128 features, not 4*4*128), a quarter of
    the multiplications; tests/test_parity.py checks the numbers against torchvision's at 32 pixels."""
    model, variables, x = small
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                 rngs={"dropout": KEY}))(variables)
    products = {tuple(v.aval.shape for v in e.invars) for e in jaxpr.eqns if e.primitive.name == "dot_general"}
    assert ((4, 2 * 2 * 128), (2 * 2 * 128, 1024)) in products
    assert ((4, 4 * 4 * 128), (4 * 4 * 128, 1024)) not in products
    assert variables["params"]["aux1"]["fc1"]["kernel"].shape == (4 * 4 * 128, 1024)  # torchvision's parameter


def test_dropout_is_reproducible_from_the_rng(small, train_apply):
    _, variables, x = small
    a, _ = train_apply(variables, x, jax.random.key(3))
    b, _ = train_apply(variables, x, jax.random.key(3))
    c, _ = train_apply(variables, x, jax.random.key(4))
    np.testing.assert_array_equal(a.logits, b.logits)
    assert not np.allclose(a.logits, c.logits)


def test_dropout_rng_is_needed_only_in_train_mode(small, eval_apply):
    model, variables, x = small
    eval_apply(variables, x)  # no rngs
    with pytest.raises(flax.errors.InvalidRngError, match='needs PRNG for "dropout"'):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)


def test_no_aux_heads_when_disabled():
    model = googlenet(num_classes=10, in_channels=1, aux_logits=False)
    x = jnp.zeros((2, 32, 32, 1))
    variables = jax.eval_shape(model.init, KEY, x)
    assert not {"aux1", "aux2"} & set(variables["params"])
    out, _ = jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                  rngs={"dropout": KEY}), variables)
    assert out.aux1 is None and out.aux2 is None and out.logits.shape == (2, 10)


@pytest.mark.slow
def test_bfloat16_computes_in_bfloat16_with_float32_parameters(small, eval_apply):
    _, variables, x = small
    model = googlenet(num_classes=10, in_channels=1, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(jax.eval_shape(model.init, KEY, x)))
    feats = jax.eval_shape(lambda v: model.apply(v, x, method="features"), variables)
    assert feats["inception5b"].dtype == jnp.bfloat16
    logits = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    assert logits.dtype == jnp.float32
    reference, _ = eval_apply(variables, x)
    # bfloat16 keeps 8 bits of mantissa: through 22 layers the logits stay within a few percent.
    assert np.linalg.norm(logits - reference) / np.linalg.norm(reference) < 0.05


@pytest.mark.slow
def test_features_give_named_stages_and_the_pooled_vector(small):
    model, variables, x = small
    feats = jax.jit(lambda v: model.apply(v, x, method="features"))(variables)
    assert {"stem", "inception3b", "inception4e", "inception5b", "pre_logits"} <= set(feats)
    assert feats["pre_logits"].shape == (4, 1024)
    np.testing.assert_allclose(feats["pre_logits"], feats["inception5b"].mean(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("variant", ["torchvision", "paper", "writeup"])
@pytest.mark.parametrize("num_classes,in_channels", [(10, 1), (1000, 3)])
def test_num_classes_and_in_channels_work_for_every_variant(variant, num_classes, in_channels):
    model = googlenet(variant, num_classes=num_classes, in_channels=in_channels)
    variables = abstract_init(model, side=224, channels=in_channels, train=True)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 224, 224, in_channels)), train=True,
                                               mutable=["batch_stats"], rngs={"dropout": KEY})[0], variables)
    assert [o.shape for o in out] == [(2, num_classes)] * 3
    assert variables["params"]["conv1"]["conv"]["kernel"].shape == (7, 7, in_channels, 64)


@pytest.mark.parametrize("variant,stages", [
    # At 224 the paper's Table 1 sizes: 56 after the stem, 28, 14, 7; aux heads pool 14 -> 4.
    ("paper", {"stem": 28, "inception3b": 28, "inception4e": 14, "inception5b": 7, "aux": 4}),
    # The write-up's floor-mode pools: 112 -> 55 -> 27 -> 13, then two pools after 4e: 13 -> 6 -> 2; aux 3x3.
    ("writeup", {"stem": 27, "inception3b": 27, "inception4e": 13, "inception5b": 2, "aux": 3}),
])
def test_paper_and_writeup_shapes_at_224(variant, stages):
    sizes = stage_sizes(variant, 224)
    assert {k: sizes[k] for k in stages} == stages
    model = googlenet(variant, num_classes=10, in_channels=1)
    feats = jax.eval_shape(lambda: model.init_with_output(KEY, jnp.zeros((1, 224, 224, 1)),
                                                          method="features")[0])
    assert feats["inception5b"].shape == (1, stages["inception5b"], stages["inception5b"], 1024)


def test_mnist_size_inputs_where_the_architecture_allows():
    x = jnp.zeros((1, 28, 28, 1))
    # The paper variant (SAME pools) runs on 28x28 without aux heads; its aux fc1 needs 4a at 14..16 pixels.
    paper = googlenet("paper", num_classes=10, in_channels=1, aux_logits=False)
    assert jax.eval_shape(lambda: paper.init_with_output(KEY, x)[0]).shape == (1, 10)
    with pytest.raises(ValueError, match=r"'paper' variant with aux heads accepts image sides of 209 to 256"):
        jax.eval_shape(lambda: googlenet("paper", num_classes=10, in_channels=1).init(KEY, x))
    # The write-up's five floor-mode pools need at least 125 pixels; its aux heads 189 to 236.
    with pytest.raises(ValueError, match=r"'writeup' variant accepts image sides of at least 125 pixels"):
        jax.eval_shape(lambda: googlenet("writeup", num_classes=10, in_channels=1, aux_logits=False).init(KEY, x))
    assert accepted_sides("writeup", aux=True) == (189, 236)


def test_the_write_ups_earlier_name_seed_is_refused_with_the_new_one():
    with pytest.raises(ValueError, match=r"^the variant 'seed' is now called 'writeup'$"):
        googlenet("seed")
    with pytest.raises(ValueError, match=r"^the loss mode 'seed' is now called 'writeup'$"):
        train.classification_loss(GoogLeNetOutputs(jnp.zeros((1, 10)), None, None), jnp.zeros(1, int), "seed")


def test_torchvision_init_statistics(small):
    """torchvision: trunc_normal(std 0.01) conv and fc weights, BatchNorm scale 1 and bias 0."""
    flat = traverse_util.flatten_dict(small[1]["params"], sep="/")
    kernels = np.concatenate([np.ravel(v) for k, v in flat.items() if k.endswith("kernel")])
    assert abs(kernels.std() - 0.01) < 2e-4 and abs(kernels.mean()) < 1e-4
    assert all(np.all(v == 1) for k, v in flat.items() if k.endswith("bn/scale"))
    assert all(np.all(v == 0) for k, v in flat.items() if k.endswith("bn/bias"))


def test_a_parameter_of_the_wrong_shape_is_refused_with_flaxs_error(small):
    """Parameters are read without tracing their initialisers (layers._param); the shape is still checked."""
    model, variables, x = small
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    flat["inception3a/branch2_1/conv/kernel"] = jnp.zeros((3, 3, 96, 127))
    bad = {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r"inception3a/branch2_1/conv.*\(3, 3, 96, 127\)"):
        jax.eval_shape(lambda: model.apply(bad, x, train=False))


@pytest.mark.parametrize("train", [True, False])
def test_inception_block_equals_torchvisions_with_its_1x1_convolutions_merged(train):
    """On the CPU's kernels an inception block in training computes its three 1x1 convolutions of x as one
    product with one batch norm (`ops.merged.merged_1x1`, as `ops.plan.merged_1x1` chooses), in eval each on its
    own. Against torchvision's own
    Inception block in float64, with batch norm's parameters and running statistics drawn at random: outputs,
    the running statistics after a train forward, and the gradients of x and of every parameter."""
    from torchvision.models.googlenet import Inception as TorchInception

    from jax_googlenet.model import VARIANTS, Inception
    from jax_googlenet.ops import plan

    spec = (64, 96, 128, 16, 32, 32)
    torch.manual_seed(0)
    block = TorchInception(192, *spec).double().train(train)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, (lo, hi) in ((m.weight, (0.5, 1.5)), (m.bias, (-0.5, 0.5)), (m.running_mean, (-1, 1)),
                                    (m.running_var, (0.5, 2))):
                    t.uniform_(lo, hi)
    initial = {name: t.clone() for name, t in block.state_dict().items()}
    x = torch.randn(2, 192, 8, 8, dtype=torch.float64, requires_grad=True)
    y = block(x)
    y.square().sum().backward()
    names = {"running_mean": "mean", "running_var": "var", "bias": "bias"}

    def flax_path(key):  # "branch2.0.conv.weight" -> ("branch2_0", "conv"), "weight"
        branch, *path, leaf = key.split(".")
        return ((f"{branch}_{path.pop(0)}",) if path[0].isdigit() else (branch,)) + tuple(path), leaf

    params, stats, torch_grads = {}, {}, {}
    for name, t in initial.items():
        path, leaf = flax_path(name)
        if leaf == "num_batches_tracked":
            continue
        key = (*path, "kernel" if t.ndim == 4 else names.get(leaf, "scale"))
        value = t.permute(2, 3, 1, 0) if t.ndim == 4 else t
        (stats if leaf.startswith("running") else params)[key] = value.numpy()
        if not leaf.startswith("running"):
            torch_grads[key] = block.get_parameter(name).grad.permute(*((2, 3, 1, 0) if t.ndim == 4 else (0,)))
    with jax.enable_x64(True):
        model = Inception(spec, VARIANTS["torchvision"], dtype=jnp.float64, param_dtype=jnp.float64, impl="winograd")
        variables = {"batch_stats": traverse_util.unflatten_dict(stats)}

        def loss(p, x):
            out, updated = model.apply({"params": p, **variables}, x, train=train, mutable=["batch_stats"])
            return jnp.sum(jnp.square(out)), (out, updated)

        with plan.recording() as rows:
            (_, (out, updated)), (dp, dx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
                traverse_util.unflatten_dict(params), jnp.asarray(x.detach().permute(0, 2, 3, 1).numpy()))
        assert [r.forward for r in rows].count("merged dot") == (1 if train else 0)
        np.testing.assert_allclose(out, y.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dx, x.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-9, atol=1e-9)
        dp = traverse_util.flatten_dict(dp)
        assert dp.keys() == torch_grads.keys()
        for key, grad in torch_grads.items():
            np.testing.assert_allclose(dp[key], grad.numpy(), rtol=1e-9, atol=1e-9, err_msg=str(key))
        after = traverse_util.flatten_dict(updated["batch_stats"])
        for key, value in block.state_dict().items():
            path, leaf = flax_path(key)
            if leaf.startswith("running"):
                np.testing.assert_allclose(after[(*path, names[leaf])], value.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["torchvision", "writeup"])
def test_folded_variables_have_the_folded_models_structure(variant):
    """`fold_batch_norm` gives each conv a bias and drops every BatchNorm: the tree a folded model creates."""
    from jax_googlenet.fold import fold_batch_norm, folded

    model = googlenet(variant, num_classes=10, in_channels=1)
    x = jnp.zeros((1, 224, 224, 1))
    variables = abstract_init(model, channels=1)
    got = jax.eval_shape(fold_batch_norm, variables)
    want = jax.eval_shape(folded(model).init, KEY, x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.tree.map(lambda a: a.shape, got) == jax.tree.map(lambda a: a.shape, want)


def test_a_folded_model_refuses_to_train():
    from jax_googlenet.fold import folded

    model = folded(googlenet(num_classes=10, in_channels=1))
    x = jnp.zeros((2, 32, 32, 1))
    variables = jax.eval_shape(model.init, KEY, x)
    with pytest.raises(ValueError, match="^a folded GoogLeNet computes inference only: apply it with train=False"):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, rngs={"dropout": KEY}), variables)
