import contextlib
import os
from pathlib import Path
from unittest import mock

# Parity is measured at full float32 precision on both sides. Set in the environment too, so that the jobs the
# tests start as subprocesses trace the same programs and hit the compilation cache the in-process runs filled
# (without it each subprocess compiled its train and eval steps again: 17 s a tiny run, measured).
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from jax._src import compiler as jax_compiler  # noqa: E402

from convert import torchvision_to_flax  # noqa: E402
from convert.torchvision import randomise_batch_norm  # noqa: E402
from jax_googlenet import compilation_cache  # noqa: E402
from jax_googlenet.ops import plan  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.set_float32_matmul_precision("highest")


@pytest.fixture(scope="session")
def torchvision_state_dict():
    """Stands in for googlenet-1378be20.pth: torchvision's init under a fixed seed, aux heads included (as the
    real file has them), BatchNorm randomised."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    randomise_batch_norm(model)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def pth_file(tmp_path_factory, torchvision_state_dict):
    path = tmp_path_factory.mktemp("weights") / "googlenet-standin.pth"
    torch.save(torchvision_state_dict, path)
    return path


@pytest.fixture(scope="session")
def variables(torchvision_state_dict):
    """The stand-in state dict converted to Flax variables, aux heads included."""
    return torchvision_to_flax(torchvision_state_dict)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for a module's in-process runs of a job, so each distinct step compiles
    once; JAX's setting (main() turns the cache on) and the environment are restored after the module."""
    cache = tmp_path_factory.mktemp("xla")
    old = os.environ.get("JAX_GOOGLENET_CACHE_DIR")
    os.environ["JAX_GOOGLENET_CACHE_DIR"] = str(cache)
    yield cache
    compilation_cache.disable()
    if old is None:
        del os.environ["JAX_GOOGLENET_CACHE_DIR"]
    else:
        os.environ["JAX_GOOGLENET_CACHE_DIR"] = old


# Three workers (pyproject.toml's addopts) on the project's 2 CPU cores: much of the suite is XLA compiling and
# processes starting, which leave a core idle, and a third worker fills it (the whole suite 703 s with two workers
# between 672 and 666 s with three, user CPU 1267 against 1218 and 1211 s, alternated; benchmarks/NOTES.md). Each
# takes a test file at a time (`--dist loadfile --no-loadscope-reorder`), the next one as its current file nears its
# end: the files that take longest (summed test durations of a whole run, --durations=0, most first) start first,
# so that no long file is left to run alone at the end.
SLOWEST_FIRST = ["test_finetune_cli.py", "test_mnist_cli.py", "test_parity.py", "test_visualize.py",
                 "test_mnist_faults.py", "test_benchmark.py", "test_predict.py", "test_faults.py",
                 "test_distributed.py", "test_model.py", "test_mnist_train.py", "test_recalibrate.py",
                 "test_export.py", "test_ops.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: a file's own order


def _with_elemental_emitters(get_compile_options):
    """JAX's `get_compile_options` adding XLA:CPU's elemental emitters (`ops.plan.ELEMENTAL_EMITTERS`) to every
    compile that sets no choice of its own."""

    def get(*args, env_options_overrides=None, **kwargs):
        overrides = {**plan.ELEMENTAL_EMITTERS, **(env_options_overrides or {})}
        return get_compile_options(*args, env_options_overrides=overrides, **kwargs)

    return get


@contextlib.contextmanager
def unoptimised():
    """XLA compiles with most optimisations off inside (`jax_disable_most_optimizations`: LLVM at level 0, its
    expensive passes skipped) and with XLA:CPU's elemental emitters: for tests of what a program computes,
    compiled once and run on small inputs, where compiling is most of the time (a 64-pixel input gradient: 10.4
    -> 5.4 s; the 16-pixel train step 6.0 -> 3.6 s with the elemental emitters, measured). JAX takes no global
    XLA option but XLA_FLAGS, read once per process, so the emitters are added where JAX makes each compile's
    options (`jax._src.compiler.get_compile_options`, looked up at each compile)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        with mock.patch.object(jax_compiler, "get_compile_options",
                               _with_elemental_emitters(jax_compiler.get_compile_options)):
            yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def unoptimised_compiles():
    """`unoptimised` for a whole module (`pytestmark = pytest.mark.usefixtures("unoptimised_compiles")`)."""
    with unoptimised():
        yield


@pytest.fixture
def unoptimised_compile():
    """`unoptimised` for one test: a job run whose steps no other run here shares."""
    with unoptimised():
        yield
