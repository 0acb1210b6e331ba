"""A model saved as one orbax checkpoint directory: its variables, the `googlenet(...)` configuration and what
serving it needs (`serving`: image size, resize, normalisation, class names)."""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jax_googlenet import imagenet
from jax_googlenet.model import GoogLeNet, accepted_sides, googlenet

CONFIG_KEYS = ("variant", "num_classes", "in_channels", "aux_logits", "transform_input")
# What a server needs besides the network: images are resized (shorter side to `resize_size`), centre-cropped to
# `image_size`, scaled to [0, 1] and normalised per channel with `mean` and `std`; logit i is `class_names[i]`.
SERVING_KEYS = ("image_size", "resize_size", "mean", "std", "class_names")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the MNIST job's normalisation (jax_googlenet.data)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_model(directory: str | Path, variables: dict[str, Any], config: dict[str, Any],
               serving: dict[str, Any] | None = None) -> Path:
    """Write `variables`, `config` (keyword arguments of `googlenet`) and `serving` to a new directory.

    orbax writes into a temporary directory and renames it when complete, so an interrupted save leaves no
    half-written checkpoint. An existing directory is an error, not overwritten.

    Args:
      directory: the new directory.
      variables: the model's variables ({"params": ..., "batch_stats": ...}).
      config: keyword arguments of `googlenet`, CONFIG_KEYS.
      serving: some of SERVING_KEYS; the others take `default_serving(config)`'s values.

    Returns:
      The directory's absolute path.
    """
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown model configuration keys {sorted(unknown)}; expected {CONFIG_KEYS}")
    googlenet(**config)  # refuse a configuration that cannot be loaded back
    serving = check_serving({**default_serving(config), **(serving or {})}, config)
    path = Path(directory).absolute()
    if path.exists():
        raise FileExistsError(f"{directory} already exists; remove it or choose another directory")
    _checkpointer().save(path, ocp.args.Composite(variables=ocp.args.StandardSave(host_copy(dict(variables))),
                                                  config=ocp.args.JsonSave(dict(config)),
                                                  serving=ocp.args.JsonSave(serving)))
    return path


def host_copy(tree: Any) -> Any:
    """`tree` with each array replicated over its devices (a model's variables, a data-parallel run's train
    state) as a NumPy copy of one replica, for orbax to save as such (process 0 writes it): orbax's path for a
    device array (its replica slices, their transfer, the sharding metadata, per array) was ~0.25 of ~0.95 s per
    save of the MNIST model's train state (493 arrays), measured. Arrays split over devices stay as they are.
    Restoring reads either kind into the shardings it is asked for. A PRNG key has no NumPy form and stays."""

    def host(x):
        if (isinstance(x, jax.Array) and x.sharding.is_fully_replicated
                and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)):
            return np.array(x.addressable_data(0))
        return x

    return jax.tree.map(host, tree)


def default_serving(config: dict[str, Any]) -> dict[str, Any]:
    """What the jobs train a model of `config` with: 1-channel models are the MNIST job's (its normalisation,
    32-pixel digits for the torchvision variant and 224 for the others as its presets, classes "0" to "9"),
    3-channel ones ImageNet's (224-pixel crops of 256-pixel resizes, ImageNet's class names for 1000 classes)."""
    n = config.get("num_classes", 1000)
    if config.get("in_channels", 3) == 1:
        side = 32 if config.get("variant", "torchvision") == "torchvision" else 224
        return dict(image_size=side, resize_size=side, mean=[MNIST_MEAN], std=[MNIST_STD],
                    class_names=[str(i) for i in range(n)])
    names = imagenet.categories() if n == 1000 else [str(i) for i in range(n)]
    return dict(image_size=imagenet.CROP, resize_size=imagenet.RESIZE, mean=list(imagenet.MEAN),
                std=list(imagenet.STD), class_names=names)


def check_serving(serving: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """`serving` with its values checked against `config` (one class name per output, one mean and std per
    input channel or one for all); a ValueError names what does not fit."""
    unknown = set(serving) - set(SERVING_KEYS)
    if unknown:
        raise ValueError(f"unknown serving keys {sorted(unknown)}; expected {SERVING_KEYS}")
    names = [str(c) for c in serving["class_names"]]
    if len(names) != config.get("num_classes", 1000):
        raise ValueError(f"{len(names)} class names for a {config.get('num_classes', 1000)}-class model")
    for key in ("mean", "std"):
        if len(serving[key]) not in (1, config.get("in_channels", 3)):
            raise ValueError(f"serving {key} {serving[key]} has neither 1 nor in_channels values")
    if not 0 < int(serving["image_size"]) <= int(serving["resize_size"]):
        raise ValueError(f"serving image_size {serving['image_size']} is not in (0, resize_size "
                         f"{serving['resize_size']}]")
    return dict(image_size=int(serving["image_size"]), resize_size=int(serving["resize_size"]),
                mean=[float(m) for m in serving["mean"]], std=[float(s) for s in serving["std"]],
                class_names=names)


def load_serving(directory: str | Path) -> dict[str, Any]:
    """The serving metadata of a model directory (`save_model`'s `serving`, with `transform_input` from its
    configuration). A directory written before `save_model` kept it gets the defaults it was trained with: the
    job's config.json beside it (a run's `model/`) gives the image size, resize and class names, else
    `default_serving`."""
    path = Path(directory).absolute()
    checkpointer = _checkpointer()
    config = checkpointer.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    if (path / "serving").is_dir():
        stored = checkpointer.restore(path, ocp.args.Composite(serving=ocp.args.JsonRestore()))["serving"]
        serving = {**default_serving(config), **stored}
    else:
        serving = default_serving(config)
        run = _run_config(path.parent / "config.json")
        if "classes" in run:
            serving["class_names"] = list(run["classes"])
        if "image_size" in run:
            serving["image_size"] = serving["resize_size"] = int(run["image_size"])
        if run.get("resize_size"):
            serving["resize_size"] = int(run["resize_size"])
    return {**check_serving(serving, config), "transform_input": bool(config.get("transform_input", False))}


def _run_config(path: Path) -> dict[str, Any]:
    """A job's config.json, or {} when there is none or it is not a JSON object."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def load_model(directory: str | Path) -> tuple[GoogLeNet, dict[str, Any]]:
    """(model, variables) from a directory written by `save_model` (or `python -m convert`)."""
    path = Path(directory).absolute()
    if not (path / "config").is_dir() or not (path / "variables").is_dir():
        raise FileNotFoundError(f"{directory} is not a model checkpoint (no config/ and variables/ in it)")
    checkpointer = _checkpointer()
    config = checkpointer.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:  # a hand-edited config: one line, as save_model refuses it
        raise ValueError(f"{directory}: unknown model configuration keys {sorted(unknown)}; expected {CONFIG_KEYS}")
    model = googlenet(**config)
    # Restore into the model's own shapes, so a checkpoint that does not fit the configuration fails here.
    first_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=first_device),
                          abstract_variables(model))
    with _closed_loop_reports_dropped():
        variables = checkpointer.restore(path, ocp.args.Composite(variables=ocp.args.StandardRestore(target)))
    return model, variables["variables"]


@contextlib.contextmanager
def _closed_loop_reports_dropped() -> Iterator[None]:
    """sys.unraisablehook without asyncio's "Event loop is closed" while the block runs, and from then on if it
    raises: a restore that fails on a damaged file closes orbax's event loop while tensorstore's other reads are
    in flight, and each of them reports the closed loop when it completes (tens of tracebacks, some after the
    caller's one-line error)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
                and any(f.name == "call_soon_threadsafe" for f in traceback.extract_tb(unraisable.exc_traceback))):
            previous(unraisable)

    sys.unraisablehook = hook
    yield  # an exception leaves the hook in place: the failed restore's reads still finish later
    sys.unraisablehook = previous


def abstract_variables(model: GoogLeNet) -> dict[str, Any]:
    """Shapes and dtypes of `model.init`'s variables (aux heads included if built), without computing them."""
    lo, hi = accepted_sides(model.variant, model.aux_logits)
    side = 224 if lo <= 224 and (hi is None or hi >= 224) else lo
    x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)
