"""The training library as the MNIST job uses it: the step learns, the two loss modes are what their docstring
says, and evaluation over a padded last batch counts every test image once. One tiny model (torchvision
variant, 1 channel, 16 px, no aux heads) is built once for the module."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_googlenet import data, train
from jax_googlenet.model import GoogLeNetOutputs, googlenet

SIZE = 16


@pytest.fixture(scope="module")
def tiny():
    model = googlenet("torchvision", num_classes=10, in_channels=1, aux_logits=False)
    state = train.create_train_state(jax.random.key(0), model, (1, SIZE, SIZE, 1), train.make_optimizer(0.05))
    sample = data.load_sample()
    picks = np.arange(0, 4000, 500)  # 8 real digits, classes 0-7 (the sample's train part is sorted by class)
    batch = {"image": sample.train.images[picks], "label": sample.train.labels[picks]}
    return state, batch, data.make_preprocess(SIZE)


@pytest.mark.slow
def test_train_steps_lower_the_loss_on_a_fixed_batch(tiny):
    state, batch, preprocess = tiny
    step = train.jit_train_step(preprocess=preprocess)
    state = jax.tree.map(jnp.copy, state)  # the step donates its input; keep the fixture's
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_jitted_steps_are_kept_per_configuration_and_an_array_argument_is_refused_in_one_line(tiny):
    """jit_train_step gives the same jitted function for the same step, bound arguments and options, so a second
    run in one process reuses its trace and executable; a bound array (e.g. a dropout key), which cannot key that
    cache, is refused with a message saying to pass it at the call."""
    _, _, preprocess = tiny
    assert train.jit_train_step(preprocess=preprocess) is train.jit_train_step(preprocess=preprocess)
    assert train.jit_train_step(preprocess=preprocess) is not train.jit_train_step(preprocess=preprocess,
                                                                                   loss_mode="writeup")
    with pytest.raises(TypeError, match="rng.*pass arrays such as a dropout key at the call") as e:
        train.jit_train_step(rng=jax.random.key(0))
    assert len(str(e.value).splitlines()) == 1


def test_writeup_loss_is_ce_of_summed_logits_and_paper_loss_sums_ces():
    labels = jnp.array([0, 1, 2])
    rng = np.random.default_rng(0)
    main, aux1, aux2 = (jnp.asarray(rng.normal(size=(3, 10)), jnp.float32) for _ in range(3))
    ce = lambda z: float(optax.softmax_cross_entropy_with_integer_labels(z, labels).mean())  # noqa: E731
    outputs = GoogLeNetOutputs(main, aux1, aux2)
    paper = float(train.classification_loss(outputs, labels, "paper"))
    writeup = float(train.classification_loss(outputs, labels, "writeup"))
    assert paper == pytest.approx(ce(main) + 0.3 * (ce(aux1) + ce(aux2)), rel=1e-6)
    assert writeup == pytest.approx(ce(main + 0.3 * aux1 + 0.3 * aux2), rel=1e-6)
    assert abs(paper - writeup) > 0.1  # not two spellings of one loss
    no_aux = GoogLeNetOutputs(main, None, None)  # without aux heads both are the plain CE
    assert float(train.classification_loss(no_aux, labels, "writeup")) == pytest.approx(ce(main), rel=1e-6)


@pytest.mark.slow
def test_eval_with_a_partial_last_batch_counts_every_image_once(tiny):
    state, _, preprocess = tiny
    sample = data.load_sample()
    test = data.ArraySource(sample.test.images[::100], sample.test.labels[::100])  # 10 digits, batches 4+4+2
    step = train.jit_eval_step(preprocess=preprocess)
    sums = {"correct": 0.0, "count": 0.0}
    for batch in data.eval_batches(test, global_batch=4):
        out = step(state, batch)
        sums = {k: sums[k] + float(out[k]) for k in sums}
    logits = jax.jit(lambda s, x: s.apply_fn({"params": s.params, "batch_stats": s.batch_stats},
                                             preprocess(x), train=False))(state, test.images)
    assert sums["count"] == 10
    assert sums["correct"] == float(np.sum(np.argmax(logits, -1) == test.labels))


def test_a_fresh_train_state_is_two_compiled_programs():
    """The model's init and the optimizer's state (SGD momentum's zeros) compile one program each: eagerly, each
    parameter shape's zeros compiled on its own (71 compiles for this model before, ~3 s of a job's cold start,
    measured). A first state of another class count compiles what is not per parameter (the key, the zeros
    input); the second one's class count gives fc shapes no other test uses."""
    make = lambda classes: train.create_train_state(  # noqa: E731
        jax.random.key(0), googlenet("torchvision", num_classes=classes, in_channels=2, aux_logits=False),
        (1, SIZE, SIZE, 2), train.make_optimizer(0.05))
    jax.block_until_ready(make(6))
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state = jax.block_until_ready(make(7))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles.count("/jax/core/compile/backend_compile_duration") == 2
    momentum = state.opt_state[0].trace
    assert jax.tree.structure(momentum) == jax.tree.structure(state.params)
    assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(momentum))


def test_the_init_compiles_with_the_options_this_jaxlib_accepts(monkeypatch):
    """The init's CPU compile options (LLVM's level 0, the elemental emitters) are experimental XLA:CPU flags:
    one that this jaxlib does not know is left out rather than failing every job's first compile."""
    assert train.init_compiler_options("cpu") == train.INIT_COMPILER_OPTIONS["cpu"]
    assert train.init_compiler_options("gpu") is None
    monkeypatch.setitem(train.INIT_COMPILER_OPTIONS, "cpu", {"xla_backend_optimization_level": 0,
                                                             "xla_cpu_no_such_option": True})
    assert train.init_compiler_options("cpu") == {"xla_backend_optimization_level": 0}


def test_the_train_state_can_be_built_abstractly_inside_a_trace():
    """`jax.eval_shape` over `create_train_state` (as a resume builds the abstract state to restore into) traces
    the init inside the outer trace, where its CPU compile options cannot apply: the shapes come back, no error."""
    model = googlenet("torchvision", num_classes=10, in_channels=1)
    abstract = jax.eval_shape(lambda: train.create_train_state(jax.random.key(0), model, (1, 32, 32, 1),
                                                               optax.sgd(0.1)))
    assert abstract.params["conv1"]["conv"]["kernel"].shape == (7, 7, 1, 64)
