"""What `jax_googlenet.checkpoint` gives orbax to save (the round trips are the job and model-directory tests')."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_googlenet import checkpoint


def test_host_copy_makes_replicated_arrays_numpy_and_leaves_keys_and_host_values_as_they_are():
    tree = {"w": jnp.arange(3.0), "step": jnp.int32(4), "key": jax.random.key(0), "n": np.ones(2), "i": 3}
    copied = checkpoint.host_copy(tree)
    assert type(copied["w"]) is np.ndarray and copied["w"].tolist() == [0.0, 1.0, 2.0]
    assert type(copied["step"]) is np.ndarray and copied["step"] == 4
    assert copied["key"] is tree["key"]  # a key has no NumPy form: orbax saves it as before
    assert copied["n"] is tree["n"] and copied["i"] == 3
