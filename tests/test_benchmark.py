"""`python -m experiments.benchmark`: one tiny run of both frameworks fills every reported field.

No test asserts a speed: the machine running CI is shared and its timings mean nothing here.
"""

import json

import pytest

import job_runs
from dispatch_probe import JOB_THEN_STEP, run

# One thread each: CI machines are shared, and oversubscribed OpenMP threads make PyTorch crawl.
TINY = ["--threads", "1", "--batch-sizes", "2", "--image-size", "32", "--repeats", "1", "--steps", "1", "--warmup", "1",
        "--workloads", "eval,train", "--frameworks", "jax,torch", "--torch-variants", "eager,channels_last"]
SPREAD = ("ms_per_step", "images_per_s")
pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # conftest.py; no test here asserts a speed
COMPILE_FIELDS = ("compile_cold_s", "compile_warm_s", "warm_cache_hit")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One run with a fresh compilation cache, so its first JAX compile is a real cold one; then, in the same
    process, a step that says whether JAX's CPU steps ran on the calling thread (tests/dispatch_probe.py)."""
    out = tmp_path_factory.mktemp("bench")
    proc = run(JOB_THEN_STEP, "experiments.benchmark", *TINY, "--compile-cache-dir", str(out / "cache"),
               "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--plot", str(out / "r.png"),
               # no test here asserts a speed, and the run's compiles are most of its time (its CPU time 86 -> 55 s
               # with LLVM's level 0, then 44 -> 32 s with the emitters; XLA's FLOP count stays within the FLOP
               # test's bounds, measured)
               XLA_FLAGS=job_runs.UNOPTIMISED)
    assert proc.returncode == 0 and "exit status 0" in proc.stdout, proc.stderr[-3000:]
    return json.loads((out / "r.json").read_text()), out, proc.stdout


@pytest.mark.slow
def test_tiny_run_has_a_cell_per_framework_variant_and_workload(tiny):
    result, _, _ = tiny
    assert result["complete"]
    got = sorted((c["workload"], c["framework"], c["variant"]) for c in result["cells"])
    assert got == sorted((w, f, v) for w in ("eval", "train")
                         for f, v in (("jax", "jit"), ("torch", "eager"), ("torch", "channels_last")))


@pytest.mark.slow
def test_every_cell_field_is_filled_and_positive(tiny):
    result, _, _ = tiny
    for cell in result["cells"]:
        eager = cell["framework"] == "torch" and cell["variant"] != "compile"
        for key, value in cell.items():
            if key in SPREAD:
                assert 0 < value["min"] <= value["median"] <= value["max"], (key, cell)
            elif key in COMPILE_FIELDS and eager:
                assert value is None, f"eager PyTorch compiles nothing, yet {key}={value}"
            elif key == "warm_cache_hit":
                assert value is True, f"the warm compile of {cell['workload']} missed the persistent cache"
            elif isinstance(value, (int, float)):
                assert value > 0, (key, cell)
            else:
                assert isinstance(value, str) and value, (key, cell)


@pytest.mark.slow
def test_jax_cold_compile_is_slower_than_the_warm_one_from_the_persistent_cache(tiny):
    # Not a speed assert on the machine: a cache load must beat XLA's whole pipeline on any machine.
    for cell in tiny[0]["cells"]:
        if cell["framework"] == "jax" and cell["workload"] == "train":
            assert cell["compile_warm_s"] < cell["compile_cold_s"]


@pytest.mark.slow
def test_flops_come_from_pytorchs_counter_and_xla_counts_no_more_than_it(tiny):
    # MFU counts the direct convolutions' work (FlopCounterMode) for every variant. XLA's cost analysis counts
    # the compiled step's own: no multiply-adds on the convolution padding (large at 32 px) and Winograd's fewer
    # products, which outweigh the elementwise ops that FlopCounterMode ignores (at 2 x 32 px XLA counts 0.61 of
    # PyTorch's eval and 0.85 of its train step). The lower bound says XLA counted the step at all.
    result = tiny[0]
    assert {c["flops_source"] for c in result["cells"]} == {"torch FlopCounterMode"}
    for check in result["flops_check"]:
        assert 0.1 * check["torch_flops"] < check["xla_flops"] <= check["torch_flops"], check
    train, evaluation = (next(c for c in result["flops_check"] if c["workload"] == w) for w in ("train", "eval"))
    assert train["torch_flops"] > 2.5 * evaluation["torch_flops"]  # backward ~2x forward, plus the aux heads


@pytest.mark.slow
def test_threads_flag_sets_both_frameworks_and_the_record_states_versions_and_device(tiny):
    m = tiny[0]["machine"]
    for key in ("jax", "jaxlib", "flax", "torch", "torchvision", "device_kind", "platform"):
        assert m[key], key
    assert "XLA_FLAGS" in m and m["cpu"]["model"]
    # --threads 1: torch.set_num_threads(1), and XLA:CPU's pool sized by NPROC=1 (its threads counted).
    assert m["torch_threads"] == m["xla_cpu_pool_threads"] == m["threads"] == 1
    assert all(p["tflops"] > 0 and p["how"] for p in tiny[0]["peak"].values())


@pytest.mark.slow
def test_markdown_and_plot_are_written(tiny):
    _, out, stdout = tiny
    text = (out / "r.md").read_text()
    assert "| JAX jit |" in text and "| PyTorch eager channels_last |" in text and "XLA / PyTorch" in text
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "threads: " in stdout
    # one allocator setting for both frameworks, printed, recorded and stated in the report
    assert "host memory: freed blocks kept for reuse" in stdout
    assert tiny[0]["settings"]["host_memory"].startswith("host memory: freed blocks kept")
    assert ("(jax_cpu_enable_async_dispatch=False); --system-malloc leaves both as they are), for both frameworks"
            in text)
    # and the setting took: the benchmark makes it before anything starts JAX's backend
    assert stdout.splitlines()[-1] == "step finished when its call returned: True"
    # the dot and convolution kernels XLA was told to use (none at 32 pixels), recorded and stated
    assert tiny[0]["settings"]["xla_compiler_options"] == {"float32": {}}
    assert "JAX float32: XLA:CPU's default dot and convolution kernels (YNNPACK's" in text


def test_peaks_are_stated_from_the_cpus_vector_units_or_the_gpu_data_sheet():
    from experiments.benchmark.machine import UsageError, cpu_peak, gpu_peak
    zen4 = {"vendor": "AuthenticAMD", "avx512f": True, "avx2_fma": True, "avx512_bf16": True, "mhz": 3000.0,
            "clock_source": "test"}
    assert cpu_peak(zen4, 2, "float32")[0] == 2 * 32 * 3e9  # two 256-bit FMA pipes, AVX-512 double-pumped
    assert cpu_peak(zen4, 2, "bfloat16")[0] == 2 * 64 * 3e9
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bfloat16")[0] == gpu_peak("NVIDIA H200", "bfloat16")[0] == 989.4e12
    assert gpu_peak("NVIDIA H100 PCIe", "float32")[0] == 378e12
    with pytest.raises(UsageError, match="--peak-tflops"):
        gpu_peak("NVIDIA L40S", "bfloat16")


@pytest.mark.slow
def test_benchmark_imports_neither_tensorflow_datasets_nor_grain():
    code = ("import sys, experiments.benchmark; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow_datasets', 'grain', 'tensorflow'}))")
    proc = run(code)
    assert proc.stdout.strip() == "[]", proc.stderr[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "float16"], "--dtypes"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--image-size", "8"], "--image-size"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    from experiments.benchmark import main
    assert main([*args, "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_jax_eval_cell_times_the_folded_model_on_variables_without_batch_norm():
    # Slow: it compiles the network three times (init, the folded and the unfolded eval step).
    # The eval cell's step is the folded model (jax_googlenet.fold) on variables folded once outside it; its
    # logits are the unfolded model's with running statistics, up to float rounding (1e-5 relative, as
    # tests/test_parity.py bounds the fold for every variant).
    from types import SimpleNamespace

    import jax
    import numpy as np
    from flax import traverse_util

    from experiments.benchmark.runners import NUM_CLASSES, CacheEvents, JaxRunner
    from jax_googlenet import googlenet

    args = SimpleNamespace(no_compile_cache=True, skip_cold_compile=True)
    runner = JaxRunner("eval", 2, 32, "float32", args, CacheEvents())
    assert set(runner.variables) == {"params", "prepared"} and runner.inference == "folded BatchNorm"
    paths = traverse_util.flatten_dict(runner.variables["params"])
    assert not [p for p in paths if "bn" in p]
    assert ("conv1", "conv", "bias") in paths
    runner.step()
    folded = np.asarray(runner.pending[-1])
    runner.sync()
    model = googlenet("torchvision", num_classes=NUM_CLASSES, aux_logits=True)
    unfolded = {"params": runner.state.params, "batch_stats": runner.state.batch_stats}
    want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(unfolded, runner.images))
    assert folded.shape == want.shape == (2, NUM_CLASSES)
    np.testing.assert_allclose(folded, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_compile_frozen_is_inference_only_and_named_in_the_tables(capsys):
    import torch

    from experiments.benchmark.cli import build_runners, parse_args
    from experiments.benchmark.reports import cell_name

    args = parse_args(["--torch-variants", "channels_last,compile_frozen"])
    assert args.torch_variants == ["channels_last", "compile_frozen"]
    args.torch_variants = ["compile_frozen"]
    assert build_runners("train", 2, "float32", args, ["torch"], torch, None) == []
    assert "no torch compile_frozen train cell: that variant is inference only" in capsys.readouterr().out
    assert cell_name({"framework": "torch", "variant": "compile_frozen"}) == "PyTorch torch.compile frozen"
    assert cell_name({"framework": "jax", "variant": "jit", "inference": "folded BatchNorm"}) == \
        "JAX jit, folded BatchNorm"


@pytest.mark.slow
def test_compile_frozen_runs_a_step_with_batch_norm_folded_by_inductor():
    # Slow: Inductor's freezing compile of the whole network takes 1-2 minutes on 2 shared CPU cores, and a
    # frozen graph bypasses Inductor's FX-graph cache. Reference: the same eager torchvision model in eval mode;
    # 1e-4 relative, since Inductor's folded convolutions (oneDNN) round differently from eager BatchNorm.
    from types import SimpleNamespace

    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from experiments.benchmark.runners import TorchRunner

    torch.set_num_threads(1)
    folded_before = counters["inductor"]["binary_folding_conv"]
    args = SimpleNamespace(no_compile_cache=False, skip_cold_compile=True)
    runner = TorchRunner("compile_frozen", "eval", 2, 32, "float32", args, torch)
    assert counters["inductor"]["binary_folding_conv"] > folded_before  # the BatchNorms went into the convs
    assert runner.compile_info["compile_cold_s"] > 0 and runner.compile_info["compile_warm_s"] is None
    assert runner.first_call_s > 0 and runner.inference == "BatchNorm folded by Inductor (freezing)"
    runner.step()
    with inductor_config.patch(freezing=True), torch.no_grad():
        got = runner.net(runner.images)
        want = runner.model(runner.images)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    with pytest.raises(ValueError, match="inference only"):
        TorchRunner("compile_frozen", "train", 2, 32, "float32", args, torch)


def test_a_compile_variant_gets_an_untimed_call_even_with_no_warmup(monkeypatch):
    # A later torch.compile variant's first call resets Dynamo's caches, so an earlier one recompiles on its next
    # call; that call must not fall in a timed window. Stand-in runners record how often they ran before timing.
    import experiments.benchmark.cli as cli

    class Fake:
        framework, first_call_s, compile_info = "torch", 1.0, {}

        def __init__(self, variant):
            self.variant, self.calls = variant, 0

        def step(self):
            self.calls += 1

        def sync(self):
            pass

        def counted_flops(self):
            return 1.0

    fakes = [Fake("eager"), Fake("compile"), Fake("compile_frozen")]
    calls_before_timing = {}

    def time_window(runner, steps):
        calls_before_timing.setdefault(runner.variant, runner.calls)
        return 0.1

    monkeypatch.setattr(cli, "build_runners", lambda *a: fakes)
    monkeypatch.setattr(cli, "time_window", time_window)
    args = cli.parse_args(["--warmup", "0", "--steps", "1", "--repeats", "1"])
    cells, _ = cli.measure_config("eval", 2, "float32", args, ["torch"], None, None, {"float32": (1e12, "test")})
    assert len(cells) == 3
    assert calls_before_timing == {"eager": 0, "compile": 1, "compile_frozen": 1}
