"""Warm start: copy pretrained GoogLeNet weights into a model of another shape or variant, as the write-up does by
hand, and say what was transferred and what was kept fresh.

Rules, leaf by leaf of the target (our Flax paths):
- same path and shape: copied (BatchNorm running statistics included);
- `conv1` kernel with another number of input channels: adapted as timm's `adapt_input_conv` does (summed over
  RGB for 1 channel; for others, RGB repeated and scaled by 3 / in_channels);
- target without BatchNorm (the "writeup" and "paper" variants) from a source with it: each BatchNorm is folded
  into its conv first (kernel * scale / sqrt(var + eps), bias = beta - mean * scale / sqrt(var + eps)), so the
  conv computes what conv + BatchNorm (eval) computed: the only transfer that keeps each layer's function;
- anything else (another num_classes' heads, the writeup variant's 5x5 convs and 1152-input aux fc1): kept fresh
  from the target's own initialisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from flax import traverse_util

from convert.torchvision import infer_config, load_state_dict, state_dict_to_flat, torchvision_to_flax
from jax_googlenet.checkpoint import load_model
from jax_googlenet.fold import fold_batch_norm_flat as fold_batch_norm
from jax_googlenet.layers import BatchNorm
from jax_googlenet.model import googlenet

BN_EPSILON = BatchNorm.epsilon  # torchvision's BasicConv2d: 1e-3


def _flat_source(pretrained: Mapping[str, Any]) -> dict[tuple, np.ndarray]:
    """Flat {path: array} from a torch state dict (torchvision or write-up names) or Flax variables."""
    if "params" in pretrained:
        return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(dict(pretrained)).items()}
    naming = "writeup" if any(k.startswith("ince_") for k in pretrained) else "torchvision"
    return {p: a for p, (_, a) in state_dict_to_flat(pretrained, naming).items()}


def adapt_input_conv(kernel: np.ndarray, in_channels: int) -> np.ndarray:
    """timm's adapt_input_conv on an HWIO kernel: sum over RGB for 1 channel, else repeat and rescale."""
    if in_channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    reps = -(-in_channels // kernel.shape[2])
    return np.tile(kernel, (1, 1, reps, 1))[:, :, :in_channels] * (kernel.shape[2] / in_channels)


def warm_start(pretrained: Mapping[str, Any], model, variables: Mapping[str, Any], *,
               fresh: Sequence[tuple[str, ...]] = (), verbose: bool = True) -> dict[str, Any]:
    """Fill `variables` (of `model`) from pretrained weights wherever that is well defined; see the module doc.

    Args:
      pretrained: a torch state dict (torchvision's or the write-up's names) or Flax variables.
      model: the target GoogLeNet (its variant says whether BatchNorm must be folded).
      variables: the target's freshly initialised variables; whatever cannot be transferred is kept from them.
      fresh: modules kept fresh even where the shapes match (e.g. the classifier heads, for new classes), as
        paths of module names: ("fc",), ("aux1", "fc2").
      verbose: print what was transferred and what was kept fresh.

    Returns:
      New variables of the target's structure.
    """
    source = _flat_source(pretrained)
    folded = not model.variant.batch_norm and any("bn" in p for p in source)
    if folded:
        source = fold_batch_norm(source)
    target = traverse_util.flatten_dict(dict(variables))
    out, copied, adapted, fresh_names = {}, [], [], []
    for path, fresh_value in target.items():
        src, name = source.get(path), "/".join(path)
        if any(path[1:1 + len(f)] == tuple(f) for f in fresh):
            out[path] = fresh_value
            fresh_names.append(f"{name} (fresh as requested)")
        elif src is not None and src.shape == fresh_value.shape:
            out[path] = np.asarray(src, fresh_value.dtype)
            copied.append(name)
        elif src is not None and path[1] == "conv1" and path[-1] == "kernel" and src.shape[:2] == fresh_value.shape[:2] \
                and src.shape[3] == fresh_value.shape[3]:
            out[path] = adapt_input_conv(src, fresh_value.shape[2]).astype(fresh_value.dtype)
            adapted.append(f"{name} ({src.shape[2]} -> {fresh_value.shape[2]} input channels, as timm)")
        else:
            out[path] = fresh_value
            why = "not in the pretrained weights" if src is None else f"pretrained {src.shape} != {fresh_value.shape}"
            fresh_names.append(f"{name} ({why})")
    if not copied and not adapted:
        raise ValueError("warm start transferred nothing: the pretrained weights share no layer with the model")
    if verbose:
        note = " (BatchNorm folded into the convs)" if folded else ""
        print(f"warm start: copied {len(copied)} of {len(target)} tensors{note}")
        for line in adapted:
            print(f"  adapted: {line}")
        for line in fresh_names:
            print(f"  kept fresh: {line}")
    return traverse_util.unflatten_dict(out)


def read_pretrained(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(model or None, weights) from a checkpoint directory written by `python -m convert` (its model and
    variables) or a .pth state dict (no model: the caller decides what it converts into)."""
    path = Path(path)
    if path.is_dir():
        return load_model(path)
    return None, load_state_dict(path)


def load_weights(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(model, variables) ready to evaluate, from a checkpoint directory or a torchvision .pth; a .pth is
    converted on the fly into the torchvision variant without its aux heads and with transform_input, as
    torchvision builds its pretrained GoogLeNet (printed)."""
    model, weights = read_pretrained(path)
    if model is not None:
        return model, weights
    config = infer_config(weights, "torchvision", aux=False)
    print(f"{path}: torchvision GoogLeNet, aux heads skipped, transform_input=True")
    model = googlenet(**config, transform_input=True)
    return model, torchvision_to_flax(weights, aux=False, model=model)


def load_pretrained(path: str | Path, model, variables: Mapping[str, Any], *,
                    fresh: Sequence[tuple[str, ...]] = ()) -> dict[str, Any]:
    """`warm_start` from a .pth state dict or a checkpoint directory written by `python -m convert`."""
    _, pretrained = read_pretrained(path)
    print(f"warm start from {path}")
    return warm_start(pretrained, model, variables, fresh=fresh)
