"""Feature visualisation and attribution for GoogLeNet (Lucid's methods in JAX).

- `render(model, variables, objective, steps=, lr=, key=, ...)`: images that maximise an objective, many at once.
- objectives (`channel`, `neuron`, `direction`, `logit`, `diversity`), composable with `+` and scalar `*`.
- `param.ImageParam`: pixels or Lucid's Fourier parameterisation, decorrelated colour, sigmoid.
- `transforms.STANDARD`: lucent's random pad, jitter, scale and rotation per step.
- `attribution`: gradients, SmoothGrad, integrated gradients and a heat-map overlay.
"""

from jax_googlenet.visualize import attribution, objectives, param, transforms
from jax_googlenet.visualize.objectives import Objective, channel, direction, diversity, logit, neuron
from jax_googlenet.visualize.render import Render, activations, layer_names, render

__all__ = ["Objective", "Render", "activations", "attribution", "channel", "direction", "diversity",
           "layer_names", "logit", "neuron", "objectives", "param", "render", "transforms"]
