"""The converter: names, layouts, strictness, safe loading, the CLI, and warm starts."""

import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util
from writeup_model import GoogLeNet as WriteupGoogLeNet

import convert
from convert import ConversionError, flax_to_torchvision, load_pretrained, torchvision_to_flax, warm_start
from convert.__main__ import main as convert_main
from convert.torchvision import flax_path, to_flax_array, torch_key
from jax_googlenet.checkpoint import abstract_variables, load_model
from jax_googlenet.model import googlenet

pytestmark = pytest.mark.usefixtures("unoptimised_compiles")  # conftest.py: compiled for what it computes


def n_params(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant, naming", [("torchvision", "torchvision"), ("paper", "torchvision"),
                                             ("writeup", "writeup")])
def test_every_flax_path_has_a_torch_key_and_back(variant, naming):
    paths = traverse_util.flatten_dict(abstract_variables(googlenet(variant)))
    keys = {torch_key(p, naming) for p in paths}
    assert len(keys) == len(paths)
    assert all(flax_path(torch_key(p, naming), naming) == p for p in paths)


def test_names_are_torchvisions_with_underscored_indices():
    assert flax_path("inception3a.branch2.1.conv.weight") == ("params", "inception3a", "branch2_1", "conv", "kernel")
    assert flax_path("conv1.bn.running_var") == ("batch_stats", "conv1", "bn", "var")
    assert flax_path("conv1.bn.weight") == ("params", "conv1", "bn", "scale")
    assert flax_path("conv1.bn.num_batches_tracked") is None
    assert flax_path("ince_3a.branch2.2.weight", "writeup") == ("params", "inception3a", "branch2_1", "conv", "kernel")
    assert flax_path("aux1.conv.bias", "writeup") == ("params", "aux1", "conv", "conv", "bias")


def test_torchvision_names_cover_torchvisions_googlenet(torchvision_state_dict, variables):
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    assert set(model.state_dict()) == set(torchvision_state_dict)
    assert n_params(variables["params"]) == 13_004_888


def test_aux_fc1_rows_follow_our_nhwc_flatten():
    """fc1 applied to torch's NCHW flatten equals our kernel applied to the NHWC flatten of the same map."""
    rng = np.random.default_rng(0)
    fmap, weight = rng.normal(size=(1, 128, 4, 4)), rng.normal(size=(1024, 2048))
    kernel = to_flax_array(("params", "aux1", "fc1", "kernel"), weight)
    np.testing.assert_allclose(fmap.reshape(1, -1) @ weight.T, fmap.transpose(0, 2, 3, 1).reshape(1, -1) @ kernel,
                               rtol=1e-12)


def test_round_trip_returns_identical_tensors_that_torchvision_loads(torchvision_state_dict, variables):
    back = flax_to_torchvision(variables)
    assert set(back) == set(torchvision_state_dict)
    assert all(torch.equal(back[k], v) for k, v in torchvision_state_dict.items())
    torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).load_state_dict(back, strict=True)


def test_without_aux_heads_matches_torchvisions_pretrained_model(torchvision_state_dict):
    v = torchvision_to_flax(torchvision_state_dict, aux=False)
    assert n_params(v["params"]) == 6_624_904
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    model.load_state_dict(flax_to_torchvision(v), strict=True)


def test_mismatches_raise_one_error_naming_every_key(torchvision_state_dict):
    sd = dict(torchvision_state_dict)
    del sd["inception4b.branch3.1.conv.weight"]
    sd["inception9z.conv.weight"] = torch.zeros(1)
    sd["inception3a.branch1.bn.running_var"] = torch.ones(7)
    with pytest.raises(ConversionError, match="^state dict does not fit the 'torchvision' GoogLeNet: ") as e:
        torchvision_to_flax(sd)
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("params/inception4b/branch3_1/conv/kernel", "inception9z.conv.weight",
                 "inception3a.branch1.bn.running_var (7,) -> batch_stats/inception3a/branch1/bn/var (64,)"):
        assert name in msg


def test_missing_aux_heads_are_named_with_the_option_to_skip_them(torchvision_state_dict):
    sd = {k: v for k, v in torchvision_state_dict.items() if not k.startswith("aux")}
    with pytest.raises(ConversionError, match="aux1/fc2/kernel.*aux=False"):
        torchvision_to_flax(sd)
    assert "aux1" not in torchvision_to_flax(sd, aux=False)["params"]


def test_another_architecture_is_refused_in_one_line():
    sd = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(ConversionError, match="^not a torchvision GoogLeNet state dict: no 'conv1.conv.weight'"):
        torchvision_to_flax(sd)


def test_writeup_checkpoints_convert_both_ways():
    torch.manual_seed(0)
    model = WriteupGoogLeNet()
    sd = model.state_dict()
    v = torchvision_to_flax(sd, variant="writeup")
    assert set(v) == {"params"}
    back = flax_to_torchvision(v, naming="writeup")
    assert all(torch.equal(back[k], t) for k, t in sd.items())
    WriteupGoogLeNet().load_state_dict(back, strict=True)


# ----------------------------------------------------------------------------------------------- files


def test_pth_loads_with_weights_only(pth_file, torchvision_state_dict):
    sd = convert.load_state_dict(pth_file)
    assert all(torch.equal(sd[k], v) for k, v in torchvision_state_dict.items())


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_a_pickle_carrying_code_is_refused(tmp_path, capfd):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.conv.weight": torch.zeros(1), "payload": _RunsCode()}, path)
    with pytest.raises(ConversionError, match=r"refused to load: the file would run code.*\(GLOBAL print\)$"):
        convert.load_state_dict(path)
    assert "this pickle ran code" not in capfd.readouterr().out


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        convert.load_state_dict(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ConversionError, match="not a PyTorch file"):
        convert.load_state_dict(tmp_path / "text.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="not a state dict"):
        convert.load_state_dict(tmp_path / "list.pth")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(ConversionError, match="plain.pkl: not a PyTorch file"):
        convert.load_state_dict(tmp_path / "plain.pkl")


# ----------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_writes_a_checkpoint_that_loads_back_and_checks_against_torch(pth_file, tmp_path, capsys, variables):
    out = tmp_path / "ckpt"
    assert convert_main(["--weights", str(pth_file), "--out", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert "transform_input=True" in text
    rel = float(text.split("relative ")[1].split()[0].rstrip(","))
    assert rel < 1e-4
    model, loaded = load_model(out)
    assert (model.variant.name, model.num_classes, model.in_channels, model.transform_input) == \
        ("torchvision", 1000, 3, True)
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, variables))
    # An existing directory is not overwritten.
    assert convert_main(["--weights", str(pth_file), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("not a pickle"), "not a PyTorch file"),
    (lambda p: torch.save(torchvision.models.resnet18(weights=None).state_dict(), p), "not a torchvision GoogLeNet"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, make, message):
    make(tmp_path / "w.pth")
    assert convert_main(["--weights", str(tmp_path / "w.pth"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_runs_as_a_module_and_fails_cleanly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "convert", "--weights", str(tmp_path / "none.pth"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {tmp_path / 'none.pth'}: no such file"


def test_cli_refuses_the_write_ups_earlier_variant_name_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="^2$"):  # the exit status
        convert_main(["--weights", str(tmp_path / "w.pth"), "--out", str(tmp_path / "o"), "--variant", "seed"])
    assert capsys.readouterr().err == ("error: argument --variant: the variant 'seed' is now called 'writeup'\n")


# ----------------------------------------------------------------------------------------------- warm start


def test_warm_start_one_channel_ten_classes(torchvision_state_dict, capsys):
    model = googlenet(num_classes=10, in_channels=1)
    fresh = abstract_to_zeros(model)
    v = warm_start(torchvision_state_dict, model, fresh)
    conv1 = torchvision_state_dict["conv1.conv.weight"].numpy().sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)
    np.testing.assert_allclose(v["params"]["conv1"]["conv"]["kernel"], conv1, rtol=1e-6)
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], fresh["params"]["fc"]["kernel"])
    np.testing.assert_array_equal(v["params"]["inception5b"]["branch1"]["bn"]["scale"],
                                  torchvision_state_dict["inception5b.branch1.bn.weight"].numpy())
    text = capsys.readouterr().out
    assert "conv1/conv/kernel (3 -> 1 input channels" in text
    for head in ("params/fc/kernel", "params/aux1/fc2/bias", "params/aux2/fc2/kernel"):
        assert f"kept fresh: {head}" in text


def test_warm_start_keeps_the_modules_asked_fresh_even_when_their_shapes_match(torchvision_state_dict, capsys):
    model = googlenet()  # 1000 classes, as the pretrained heads
    fresh = abstract_to_zeros(model)
    v = warm_start(torchvision_state_dict, model, fresh, fresh=(("fc",), ("aux1", "fc2")))
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], fresh["params"]["fc"]["kernel"])
    np.testing.assert_array_equal(v["params"]["aux1"]["fc2"]["bias"], fresh["params"]["aux1"]["fc2"]["bias"])
    np.testing.assert_array_equal(v["params"]["aux2"]["fc2"]["bias"],
                                  torchvision_state_dict["aux2.fc2.bias"].numpy())
    text = capsys.readouterr().out
    assert "kept fresh: params/fc/kernel (fresh as requested)" in text and "params/aux2/fc2" not in text


def test_warm_start_other_channel_counts_follow_timm():
    k = np.random.default_rng(0).normal(size=(7, 7, 3, 64)).astype(np.float32)
    from convert.pretrained import adapt_input_conv

    assert adapt_input_conv(k, 4).shape == (7, 7, 4, 64)
    np.testing.assert_allclose(adapt_input_conv(k, 4)[:, :, 3], k[:, :, 0] * 0.75, rtol=1e-6)


def test_warm_start_writeup_variant_folds_batch_norm_as_torch_fuses_it(torchvision_state_dict, capsys):
    model = googlenet("writeup", num_classes=10, in_channels=1)
    fresh = abstract_to_zeros(model)
    v = warm_start(torchvision_state_dict, model, fresh)
    sd = torchvision_state_dict
    w, b = torch.nn.utils.fusion.fuse_conv_bn_weights(
        sd["inception4c.branch2.1.conv.weight"], None, sd["inception4c.branch2.1.bn.running_mean"],
        sd["inception4c.branch2.1.bn.running_var"], 1e-3, sd["inception4c.branch2.1.bn.weight"],
        sd["inception4c.branch2.1.bn.bias"])
    conv = v["params"]["inception4c"]["branch2_1"]["conv"]
    np.testing.assert_allclose(conv["kernel"], w.detach().numpy().transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(conv["bias"], b.detach().numpy(), rtol=1e-5, atol=1e-7)
    text = capsys.readouterr().out
    assert "BatchNorm folded" in text
    # The writeup variant's 5x5 "5x5" branch and 1152-input aux fc1 have no pretrained counterpart.
    assert "kept fresh: params/inception3a/branch3_1/conv/kernel (pretrained (3, 3, 16, 32) != (5, 5, 16, 32))" in text
    assert "kept fresh: params/aux1/fc1/kernel" in text
    np.testing.assert_array_equal(v["params"]["inception3a"]["branch3_1"]["conv"]["kernel"],
                                  fresh["params"]["inception3a"]["branch3_1"]["conv"]["kernel"])


def test_load_pretrained_from_pth_and_from_a_converted_checkpoint(pth_file, tmp_path, capsys):
    model = googlenet(num_classes=10, in_channels=1, aux_logits=False)
    fresh = abstract_to_zeros(model)
    from_pth = load_pretrained(pth_file, model, fresh)
    assert convert_main(["--weights", str(pth_file), "--out", str(tmp_path / "c"), "--no-aux"]) == 0
    from_dir = load_pretrained(tmp_path / "c", model, fresh)
    assert jax.tree.all(jax.tree.map(np.array_equal, from_pth, from_dir))
    assert "warm start from" in capsys.readouterr().out


def abstract_to_zeros(model):
    """Stand-in for a fresh init: distinguishable from any transferred weight, and no compilation."""
    return jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), abstract_variables(model))
