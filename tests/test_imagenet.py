"""ImageNet preprocessing and categories against torchvision's (the predict CLI: test_predict.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
import torchvision

from jax_googlenet.imagenet import (STD, categories, center_crop_offsets, preprocess, resize_and_center_crop,
                                   resized_size)

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


@pytest.mark.parametrize("height, width, size, crop", [(300, 451, 256, 224), (512, 300, 256, 224), (37, 50, 36, 32),
                                                       (1000, 17, 36, 32), (224, 224, 256, 224), (256, 400, 256, 224),
                                                       (20, 1, 16, 16)])
def test_the_crop_alone_is_resized_to_the_whole_resizes_pixels(height, width, size, crop):
    """`resize_and_center_crop` computes only the crop's pixels; they are jax.image.resize's whole image, cropped,
    within 1e-4 of 255 (the products are blocked otherwise), so rounded to uint8 a value at an exact .5 may go
    the other way: one level, on under 1e-4 of the values (measured 0 to 2e-5)."""
    image = jnp.asarray(np.random.default_rng(height * width).integers(0, 256, (height, width, 3)), jnp.float32)
    h, w = resized_size(height, width, size)
    top, left = center_crop_offsets(h, w, crop)
    whole = jax.image.resize(image, (h, w, 3), method="linear", antialias=True)[top:top + crop, left:left + crop]
    ours = resize_and_center_crop(image, size, crop)
    assert ours.shape == (crop, crop, 3)
    np.testing.assert_allclose(ours, whole, rtol=0, atol=1e-4)
    levels = np.abs(np.round(np.asarray(ours)) - np.round(np.asarray(whole)))
    assert levels.max() <= 1 and np.mean(levels > 0) < 1e-4


def test_categories_are_torchvisions():
    assert categories() == WEIGHTS.meta["categories"]
