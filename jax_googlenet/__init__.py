"""GoogLeNet (Inception v1) in JAX/Flax, torchvision-exact, with pretrained weights and fast training."""

from jax_googlenet.model import VARIANTS, GoogLeNet, GoogLeNetOutputs, Variant, googlenet
from jax_googlenet.sizes import accepted_sides, stage_sizes

__all__ = ["VARIANTS", "GoogLeNet", "GoogLeNetOutputs", "Variant", "accepted_sides", "googlenet", "stage_sizes"]
