"""torchvision GoogLeNet state dicts <-> Flax variables, strict in both directions.

A torch key maps to a Flax path mechanically (`flax_path`, `torch_key`): ".N" becomes "_N", a conv or Linear
`weight` becomes `kernel` (OIHW -> HWIO, Linear transposed), BatchNorm `weight`/`bias` become `scale`/`bias`,
`running_mean`/`running_var` go to the `batch_stats` collection as `mean`/`var`, and `num_batches_tracked`
(used by torch only when BatchNorm momentum is None) is dropped. The aux heads' fc1 reads a flattened 4x4x128
map, which torch flattens as (c, h, w) and we as (h, w, c): its rows are permuted.

Two namings: "torchvision" (torchvision.models.googlenet, e.g. ``inception3a.branch2.1.conv.weight``) and
"writeup" (the PyTorch model of the write-up this project started from, e.g. ``ince_3a.branch2.2.weight``),
which converts into our "writeup" variant.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from jax_googlenet.checkpoint import abstract_variables
from jax_googlenet.model import check_variant, googlenet

NAMINGS = ("torchvision", "writeup")
# The write-up's Sequential indices: branch2 = [conv 1x1, ReLU, conv 3x3, ReLU], branch4 = [pool, ReLU, conv, ReLU].
_WRITEUP_BRANCHES = {("branch1", "0"): "branch1", ("branch2", "0"): "branch2_0", ("branch2", "2"): "branch2_1",
                     ("branch3", "0"): "branch3_0", ("branch3", "2"): "branch3_1", ("branch4", "2"): "branch4_1"}
_WRITEUP_BRANCHES_INV = {v: k for k, v in _WRITEUP_BRANCHES.items()}
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_BN_LEAVES_INV = {v: k for k, v in _BN_LEAVES.items()}


class ConversionError(ValueError):
    """A state dict that does not fit the target model; the message names every offending key."""


def default_naming(variant: str) -> str:
    return "writeup" if variant == "writeup" else "torchvision"


# ----------------------------------------------------------------------------------------------- names


def flax_path(key: str, naming: str = "torchvision") -> tuple[str, ...] | None:
    """("params" | "batch_stats", module..., leaf) for a torch key; None for `num_batches_tracked`."""
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if naming == "writeup":
        *mods, leaf = parts
        if mods and mods[0].startswith("ince_"):
            mods = ["inception" + mods[0][5:], _WRITEUP_BRANCHES.get(tuple(mods[1:3]), ".".join(mods[1:]))]
        # Every conv of the write-up is our BasicConv's `conv`; fcs are plain Dense layers.
        if not (mods and mods[-1].startswith("fc")):
            mods.append("conv")
        return ("params", *mods, "kernel" if leaf == "weight" else leaf)
    if naming != "torchvision":
        raise ValueError(f"unknown naming {naming!r}; choose one of {NAMINGS}")
    mods = []
    for p in parts[:-1]:
        if p.isdigit() and mods:
            mods[-1] += "_" + p
        else:
            mods.append(p)
    leaf = parts[-1]
    if mods and mods[-1] == "bn" and leaf in _BN_LEAVES:
        collection, leaf = _BN_LEAVES[leaf]
        return (collection, *mods, leaf)
    return ("params", *mods, "kernel" if leaf == "weight" else leaf)


def torch_key(path: tuple[str, ...], naming: str = "torchvision") -> str:
    """The torch key of a Flax path (the inverse of `flax_path`)."""
    collection, *mods, leaf = path
    if mods and mods[-1] == "bn":
        leaf = _BN_LEAVES_INV[(collection, leaf)]
    elif leaf == "kernel":
        leaf = "weight"
    if naming == "writeup":
        if mods[-1] == "conv":
            mods = mods[:-1]
        if mods[0].startswith("inception"):
            mods = ["ince_" + mods[0][9:], *_WRITEUP_BRANCHES_INV[mods[1]]]
        return ".".join([*mods, leaf])
    return ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in mods] + [leaf])


# ----------------------------------------------------------------------------------------------- tensors


def _is_aux_fc1(path: tuple[str, ...]) -> bool:
    return len(path) >= 3 and path[-3].startswith("aux") and path[-2] == "fc1" and path[-1] == "kernel"


def _aux_fc1_rows(n_in: int, channels: int = 128) -> np.ndarray:
    """perm such that ours[i] = torch's[perm[i]]: torch flattens (c, h, w), we (h, w, c)."""
    side = int(round((n_in // channels) ** 0.5))
    if side * side * channels != n_in:
        raise ConversionError(f"aux fc1 reads {n_in} features, not a square grid of {channels} channels")
    return np.arange(n_in).reshape(channels, side, side).transpose(1, 2, 0).reshape(-1)


def to_flax_array(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """A torch tensor (as numpy) in our layout: OIHW -> HWIO, Linear (out, in) -> (in, out)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        kernel = value.T
        return kernel[_aux_fc1_rows(kernel.shape[0])] if _is_aux_fc1(path) else kernel
    return value


def to_torch_array(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """The inverse of `to_flax_array`."""
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
        if _is_aux_fc1(path):
            value = value[np.argsort(_aux_fc1_rows(value.shape[0]))]
        return value.T
    return value


def _numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor
        return t.detach().cpu().numpy()
    return np.asarray(t)


def state_dict_to_flat(state_dict: Mapping[str, Any], naming: str = "torchvision") -> dict[tuple, tuple[str, np.ndarray]]:
    """{flax path: (torch key, array in our layout)}, mechanically, without checking against a model."""
    flat = {}
    for key, tensor in state_dict.items():
        path = flax_path(key, naming)
        if path is not None:
            flat[path] = (key, to_flax_array(path, _numpy(tensor)))
    return flat


# ----------------------------------------------------------------------------------------------- models


def infer_config(state_dict: Mapping[str, Any], variant: str = "torchvision", *, aux: bool = True,
                 naming: str | None = None) -> dict[str, Any]:
    """`googlenet(**config)` arguments read off a state dict: num_classes from fc, in_channels from conv1."""
    check_variant(variant)
    naming = naming or default_naming(variant)
    conv1, fc = torch_key(("params", "conv1", "conv", "kernel"), naming), "fc.weight"
    if conv1 not in state_dict or fc not in state_dict or len(getattr(state_dict[conv1], "shape", ())) != 4:
        sample = ", ".join(list(state_dict)[:4])
        raise ConversionError(f"not a {naming} GoogLeNet state dict: no {conv1!r} and {fc!r} "
                              f"(its keys start {sample or 'nowhere: it is empty'})")
    return {"variant": variant, "num_classes": int(state_dict[fc].shape[0]),
            "in_channels": int(state_dict[conv1].shape[1]), "aux_logits": aux}


def without_aux(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict without the aux heads' keys (`aux1.*`, `aux2.*`)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(("aux1.", "aux2."))}


def _fmt(path: tuple[str, ...]) -> str:
    return "/".join(path)


def torchvision_to_flax(state_dict: Mapping[str, Any], *, variant: str = "torchvision", aux: bool = True,
                        naming: str | None = None, model=None) -> dict[str, Any]:
    """Convert a PyTorch GoogLeNet state dict to Flax variables, strictly.

    Args:
      state_dict: torch key -> tensor (or array), e.g. `torch.load("googlenet-1378be20.pth", weights_only=True)`.
      variant: our variant to fill: "torchvision" (torchvision's names) or "writeup" (the write-up's names).
      aux: convert the aux heads; False skips every `aux1.*`/`aux2.*` key (the pretrained file's aux heads are
        untrained, and torchvision drops them unless asked) and builds the target without them.
      naming: "torchvision" or "writeup"; by default "writeup" for the writeup variant, else "torchvision".
      model: the target GoogLeNet; by default `googlenet(**infer_config(state_dict, variant, aux=aux))`.

    Returns:
      {"params": ..., "batch_stats": ...} (no "batch_stats" for variants without BatchNorm), numpy float32.

    Raises:
      ConversionError naming every source key left unused, every target leaf left unfilled, every shape mismatch.
    """
    naming = naming or default_naming(variant)
    if model is None:
        model = googlenet(**infer_config(state_dict, variant, aux=aux, naming=naming))
    if not aux:
        state_dict = without_aux(state_dict)
    source = state_dict_to_flat(state_dict, naming)
    target = traverse_util.flatten_dict(abstract_variables(model))
    unused = [key for path, (key, _) in source.items() if path not in target]
    unfilled = [_fmt(path) for path in target if path not in source]
    mismatched = [f"{source[p][0]} {tuple(source[p][1].shape)} -> {_fmt(p)} {tuple(t.shape)}"
                  for p, t in target.items() if p in source and source[p][1].shape != t.shape]
    if unused or unfilled or mismatched:
        problems = [f"{what} ({len(items)}): {', '.join(items)}" for what, items in
                    (("unused source keys", unused), ("unfilled target leaves", unfilled),
                     ("shape mismatches (ours in HWIO / (in, out))", mismatched)) if items]
        hint = " (pass aux=False / --no-aux to convert without the aux heads)" if any(
            "aux" in u for u in unfilled) else ""
        raise ConversionError(f"state dict does not fit the {model.variant.name!r} GoogLeNet: "
                              + "; ".join(problems) + hint)
    flat = {p: source[p][1].astype(np.float32) for p in target}
    return traverse_util.unflatten_dict(flat)


def flax_to_torchvision(variables: Mapping[str, Any], *, naming: str = "torchvision") -> dict[str, Any]:
    """Flax variables -> a torch state dict that `torchvision.models.googlenet(...).load_state_dict(sd,
    strict=True)` accepts (or the write-up's model, with naming="writeup"). BatchNorm's `num_batches_tracked`,
    which Flax does not keep, is written as 0."""
    import torch

    sd = {}
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        sd[torch_key(path, naming)] = torch.from_numpy(np.array(to_torch_array(path, np.asarray(value)), order="C"))
        if path[-2] == "bn" and path[-1] == "mean":
            sd[torch_key(path, naming).rsplit(".", 1)[0] + ".num_batches_tracked"] = torch.tensor(0)
    return sd


# ----------------------------------------------------------------------------------------------- loading


def randomise_batch_norm(model: Any, seed: int = 1) -> None:
    """Random BatchNorm affine parameters and running statistics in a torch `model`, in place, so that BatchNorm
    is not an identity (torchvision's init leaves it one) when a parity test or a benchmark compares networks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2), (m.running_mean, -0.5, 0.5),
                                  (m.running_var, 0.5, 2.0)):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Load a .pth state dict without running code: `torch.load(weights_only=True)` refuses any pickle that
    would build something other than tensors and plain containers."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Keep the words naming the refused global, not torch's advice on how to allow it.
        found = re.search(r"GLOBAL \S+", str(e))
        if not found:
            raise ConversionError(f"{path}: not a PyTorch file (it cannot be unpickled)") from None
        raise ConversionError(f"{path}: refused to load: the file would run code or build objects other than "
                              f"tensors ({found.group(0)})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise ConversionError(f"{path}: not a PyTorch file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # training checkpoints often wrap it
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and hasattr(v, "shape") for k, v in sd.items()):
        raise ConversionError(f"{path}: not a state dict (expected a dict of name -> tensor, got "
                              f"{type(sd).__name__})")
    return sd


def download_state_dict() -> dict[str, Any]:
    """torchvision's IMAGENET1K_V1 GoogLeNet weights (downloaded once to torch's hub cache; needs network)."""
    from torchvision.models import GoogLeNet_Weights

    weights = GoogLeNet_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - urllib, hash and IO errors all mean the same to the user
        raise ConversionError(f"could not download {weights.url} ({type(e).__name__}: {e}); download it "
                              "elsewhere and pass the file with --weights") from None
