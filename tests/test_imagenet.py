"""ImageNet preprocessing and categories against torchvision's, and the predict CLI end to end."""

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image

from experiments import predict
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


def test_predict_prints_top5_for_each_image(pth_file, tmp_path, capsys, torchvision_state_dict):
    paths = []
    for photo in ("chelsea", "coffee"):
        paths.append(tmp_path / f"{photo}.png")
        Image.fromarray(getattr(skimage.data, photo)()).save(paths[-1])
    assert predict.main(["--weights", str(pth_file), *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    blocks = [lines[i:i + 6] for i in range(1, len(lines), 6)]
    assert [b[0] for b in blocks] == list(map(str, paths))
    # The same top-5 as torchvision's model with these weights on torchvision's preprocessing.
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    model.load_state_dict({k: v for k, v in torchvision_state_dict.items() if not k.startswith("aux")})
    names = categories()
    for block, photo in zip(blocks, ("chelsea", "coffee")):
        x = WEIGHTS.transforms()(torch.from_numpy(getattr(skimage.data, photo)()).permute(2, 0, 1))
        with torch.no_grad():
            probs = model.eval()(x[None]).softmax(-1)[0]
        top = probs.topk(5)
        expected = [f"{p:7.2%}  {names[c]}" for p, c in zip(top.values.tolist(), top.indices.tolist())]
        assert [ln.strip() for ln in block[1:]] == [e.strip() for e in expected]


def test_predict_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "x.png").write_text("not an image")
    assert predict.main(["--weights", str(tmp_path / "missing.pth"), str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert predict.main(["--weights", str(tmp_path), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
