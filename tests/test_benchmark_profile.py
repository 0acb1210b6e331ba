"""`python -m experiments.benchmark.profile`: the benchmark's JAX step profiled, its thunks attributed to layers."""

import gzip
import json
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


def _trace(tmp_path, events):
    """A profiler directory holding a perfetto trace of `events` (name, thread, start, duration in microseconds)."""
    trace = {"traceEvents": [{"ph": "X", "name": n, "tid": t, "ts": ts, "dur": d, "pid": 1} for n, t, ts, d in events]}
    (tmp_path / "run").mkdir()
    with gzip.open(tmp_path / "run" / "host.trace.json.gz", "wt") as f:
        json.dump(trace, f)
    return tmp_path


def test_the_pools_unnamed_work_goes_to_the_convolutions_and_dots_in_flight(tmp_path):
    """XLA:CPU's convolution thunk is only its dispatch in the trace (~50 us for conv1, whose work takes ms): the
    kernel runs as tasks of the threadpool, regions no event names, until the thunk's "end:" event. That time goes
    to the convolutions and dots in flight, split evenly; named thunks inside a region keep their own time; pool
    time with nothing in flight goes to no thunk."""
    start, stop = "ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion"
    trace = _trace(tmp_path, [
        ("add_fusion.1", 1, 0, 4),            # a loop fusion before the convolution: 4 us, its own
        ("conv_general_dilated.0", 1, 10, 1), (start, 1, 12, 0), (stop, 1, 22, 0),   # 10 us unnamed on thread 1
        (start, 2, 13, 0), ("maximum_fusion.3", 2, 15, 2), (stop, 2, 23, 0),          # 2 + 6 us on thread 2
        ("end: conv_general_dilated.0", 1, 25, 0),
        ("dot_general.7", 1, 30, 5), (start, 2, 31, 0), (stop, 2, 34, 0),             # the dot's other shard: 3 us
        ("end: dot_general.7", 1, 35, 0),
        ("dot_general.9", 1, 40, 2), ("conv_general_dilated.2", 3, 41, 1),           # two in flight: 4 us shared
        (start, 2, 43, 0), (stop, 2, 47, 0), ("end: dot_general.9", 1, 50, 0),
        ("end: conv_general_dilated.2", 3, 50, 0),
        (start, 2, 60, 0), (stop, 2, 61, 0),                                          # nothing in flight
        ("ThunkExecutor::Execute", 3, 0, 70),
    ])
    times = profile.thunk_times(trace)
    assert times == {"add_fusion.1": 4, "conv_general_dilated.0": 1 + 10 + 8, "maximum_fusion.3": 2,
                     "dot_general.7": 5 + 3, "dot_general.9": 2 + 2, "conv_general_dilated.2": 1 + 2}


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
