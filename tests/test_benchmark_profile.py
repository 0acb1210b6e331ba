"""`python -m experiments.benchmark.profile`: the benchmark's JAX step profiled, its thunks attributed to layers."""

from types import SimpleNamespace

import pytest

from experiments.benchmark import profile


def test_op_names_map_to_the_networks_layers():
    assert profile.layer_of("jit(f)/GoogLeNet/GoogLeNet._forward/conv3/conv/dot_general") == "conv3"
    assert profile.layer_of("jit(f)/GoogLeNet/GoogLeNet._forward/inception4a/branch2_1/conv/add") == \
        "inception4a/branch2_1"
    assert profile.layer_of("jit(f)/transpose(jvp(GoogLeNet))/GoogLeNet._forward/inception3b/branch1/conv/dot") == \
        "inception3b/branch1"
    assert profile.layer_of("jit(f)/GoogLeNet/GoogLeNet._forward/GoogLeNet._pools/max") == "pools"
    assert profile.layer_of("jit(train_step)/sgd/mul") == "(other)"


@pytest.mark.slow
def test_the_folded_eval_step_is_attributed_layer_by_layer():
    """One profiled call of the 32-pixel folded eval step: its thunks land on the network's layers, conv3 and the
    classifier among them (what has no layer, XLA's own copies, is under 5%: measured 0.5%), and the markdown
    lists them."""
    result = profile.profile("eval", 2, 32, 1, compile_cache=False)
    layers = result["layers"]
    assert {"conv1", "conv3", "fc", "inception3a/branch2_1", "inception5b/branch1"} <= set(layers)
    assert layers["(other)"] < 0.05 * sum(layers.values()) and all(v >= 0 for v in layers.values())
    text = profile.markdown(result, SimpleNamespace(workload="eval", batch_size=2, image_size=32, calls=1, kinds=5))
    assert "| conv3 |" in text and "(folded BatchNorm)" in text
