"""ImageNet preprocessing and categories against torchvision's (the predict CLI: test_predict.py)."""

import numpy as np
import pytest
import skimage.data
import torch
import torchvision

from jax_googlenet.imagenet import STD, categories, preprocess

WEIGHTS = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1


@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "coffee"])
def test_preprocess_equals_torchvisions_eval_transform(photo):
    """Both resize a uint8 image to uint8; the antialiased bilinear weights are summed in another order, so a
    pixel may round the other way at an exact .5: one uint8 level at most, on under 1e-4 of the values
    (measured: none on astronaut, 2e-5 of chelsea's and coffee's)."""
    image = getattr(skimage.data, photo)()
    ref = WEIGHTS.transforms()(torch.from_numpy(image).permute(2, 0, 1)).numpy().transpose(1, 2, 0)
    ours = np.asarray(preprocess(image))
    assert ours.shape == ref.shape == (224, 224, 3)
    one_level = 1 / 255 / min(STD)
    assert np.abs(ours - ref).max() <= one_level * 1.001
    assert np.mean(np.abs(ours - ref) > 1e-5) < 1e-4


def test_categories_are_torchvisions():
    assert categories() == WEIGHTS.meta["categories"]
