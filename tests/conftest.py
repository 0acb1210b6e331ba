import os

import jax
import pytest
import torch
import torchvision

from convert import torchvision_to_flax
from convert.torchvision import randomise_batch_norm
from jax_googlenet import compilation_cache

# Parity is measured at full float32 precision on both sides.
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
