"""PyTorch <-> Flax conversion of GoogLeNet weights (the only package besides tests/ that imports torch)."""

from convert.pretrained import load_pretrained, load_weights, read_pretrained, warm_start
from convert.torchvision import (ConversionError, flax_to_torchvision, infer_config, load_state_dict,
                                 torchvision_to_flax)

__all__ = ["ConversionError", "flax_to_torchvision", "infer_config", "load_pretrained", "load_state_dict",
           "load_weights", "read_pretrained", "torchvision_to_flax", "warm_start"]
