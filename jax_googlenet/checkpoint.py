"""A model saved as one orbax checkpoint directory: its variables and the `googlenet(...)` configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jax_googlenet.model import GoogLeNet, accepted_sides, googlenet

CONFIG_KEYS = ("variant", "num_classes", "in_channels", "aux_logits", "transform_input")


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_model(directory: str | Path, variables: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write `variables` and `config` (keyword arguments of `googlenet`) to a new directory.

    orbax writes into a temporary directory and renames it when complete, so an interrupted save leaves no
    half-written checkpoint. An existing directory is an error, not overwritten.
    """
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown model configuration keys {sorted(unknown)}; expected {CONFIG_KEYS}")
    googlenet(**config)  # refuse a configuration that cannot be loaded back
    path = Path(directory).absolute()
    if path.exists():
        raise FileExistsError(f"{directory} already exists; remove it or choose another directory")
    _checkpointer().save(path, ocp.args.Composite(variables=ocp.args.StandardSave(dict(variables)),
                                                  config=ocp.args.JsonSave(dict(config))))
    return path


def load_model(directory: str | Path) -> tuple[GoogLeNet, dict[str, Any]]:
    """(model, variables) from a directory written by `save_model` (or `python -m convert`)."""
    path = Path(directory).absolute()
    if not (path / "config").is_dir() or not (path / "variables").is_dir():
        raise FileNotFoundError(f"{directory} is not a model checkpoint (no config/ and variables/ in it)")
    checkpointer = _checkpointer()
    config = checkpointer.restore(path, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    model = googlenet(**config)
    # Restore into the model's own shapes, so a checkpoint that does not fit the configuration fails here.
    first_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=first_device),
                          abstract_variables(model))
    variables = checkpointer.restore(path, ocp.args.Composite(variables=ocp.args.StandardRestore(target)))
    return model, variables["variables"]


def abstract_variables(model: GoogLeNet) -> dict[str, Any]:
    """Shapes and dtypes of `model.init`'s variables (aux heads included if built), without computing them."""
    lo, hi = accepted_sides(model.variant, model.aux_logits)
    side = 224 if lo <= 224 and (hi is None or hi >= 224) else lo
    x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)
