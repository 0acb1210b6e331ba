"""Image-folder and TFDS sources (jax_googlenet.data.folder, .tfds_images) and the host transforms
(jax_googlenet.data.transforms) against torchvision's own ImageFolder, transforms and RandomResizedCrop.get_params;
the grain pipelines over them (jax_googlenet.data.pipeline)."""

import math
import os
import struct
import zlib
from unittest import mock

import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from jax_googlenet import data
from jax_googlenet.data import folder, pipeline, transforms

PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket")  # camera is grey


def photo(name):
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def write_folder(root, classes, per_class=3, side=20):
    """PNG squares of a colour per class, sides varying around `side`."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image = np.full((side + k, side + 2 * k, 3), 40 * (c + 1) % 256, np.uint8)
            Image.fromarray(image).save(root / name / f"{k}.png")
    return root


# ----------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("resize_to, size", [(256, 224), (37, 32)])
def test_eval_transform_is_torchvisions_resize_and_center_crop_bit_for_bit(name, resize_to, size):
    image = photo(name)
    ref = np.asarray(T.Compose([T.Resize(resize_to), T.CenterCrop(size)])(image))
    ours = transforms.eval_transform({"image": image, "label": 0, "index": 0}, size=size, resize_to=resize_to)
    assert ours["image"].dtype == np.uint8 and ours["image"].shape == (size, size, 3)
    np.testing.assert_array_equal(ours["image"], ref)


@pytest.mark.parametrize("name", PHOTOS)
def test_random_resized_crop_of_a_box_is_torchvisions_resized_crop_bit_for_bit(name):
    image = photo(name)
    rng = np.random.default_rng(0)
    for _ in range(5):
        top, left, h, w = transforms.random_resized_crop_box(image.height, image.width, rng)
        ref = np.asarray(F.resized_crop(image, top, left, h, w, [224, 224], T.InterpolationMode.BILINEAR))
        box = iter([top, left, h, w])
        with mock.patch.object(transforms, "random_resized_crop_box",
                               lambda *a: (next(box), next(box), next(box), next(box))):
            ours = np.asarray(transforms.random_resized_crop(image, 224, rng))
        np.testing.assert_array_equal(ours, ref)


def test_train_transform_flips_half_the_time_as_torchvisions_hflip():
    image = photo("chelsea")
    record = {"image": image, "label": 3, "index": 0}
    flips = 0
    for seed in range(40):
        out = transforms.train_transform(record, np.random.default_rng(seed), size=64)["image"]
        unflipped = np.asarray(transforms.random_resized_crop(image, 64, np.random.default_rng(seed)))
        if not np.array_equal(out, unflipped):
            np.testing.assert_array_equal(out, np.asarray(F.hflip(Image.fromarray(unflipped))))
            flips += 1
    assert 10 <= flips <= 30  # binomial(40, 1/2): outside this range with probability 0.002


class Replay:
    """Feeds the same unit draws to our sampler (as a numpy Generator) and to torchvision's (as torch)."""

    def __init__(self, units):
        self.units = list(units)

    def uniform(self, lo, hi):
        return lo + self.units.pop(0) * (hi - lo)

    def integers(self, lo, hi):
        return lo + int(self.units.pop(0) * (hi - lo))


def torchvision_box(height, width, units):
    """torchvision's get_params with torch.empty(1).uniform_ and torch.randint drawing from `units`."""
    replay = Replay(units)

    class Empty:
        def uniform_(self, lo, hi):
            return torch.tensor([replay.uniform(float(lo), float(hi))], dtype=torch.float64)

    def randint(lo, hi, size):
        return torch.tensor([replay.integers(lo, hi)])

    with mock.patch.object(torch, "empty", lambda *a, **k: Empty()), mock.patch.object(torch, "randint", randint):
        return T.RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])


@pytest.mark.parametrize("height, width, thin", [(224, 224, False), (300, 451, False), (15, 15, False),
                                                  (20, 400, True), (500, 14, True)])
def test_random_resized_crop_box_follows_torchvisions_get_params_draw_for_draw(height, width, thin):
    """Same draws, same boxes: the 10 attempts, the acceptance test and the centre-crop fallback, which the thin
    images reach often (a fallback uses the 20 draws of the attempts and no position draw)."""
    rng = np.random.default_rng(1)
    fallbacks = 0
    for _ in range(100):
        units = rng.random(2 * transforms.ATTEMPTS + 2)
        replay = Replay(units)
        assert transforms.random_resized_crop_box(height, width, replay) == torchvision_box(height, width, units)
        fallbacks += len(replay.units) == 2
    assert (fallbacks > 10) if thin else (fallbacks < 2)


@pytest.mark.parametrize("height, width", [(300, 451), (40, 400)])
def test_random_resized_crop_boxes_have_torchvisions_statistics(height, width):
    """Our numpy draws against torchvision's own torch RNG, 2,000 boxes each: the mean area fraction, log aspect
    ratio, share of whole-height boxes and top offset agree within 5 standard errors."""
    n = 2000
    rng = np.random.default_rng(0)
    ours = np.array([transforms.random_resized_crop_box(height, width, rng) for _ in range(n)], float)
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    ref = np.array([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], float)
    for stat in (lambda b: b[:, 2] * b[:, 3] / (height * width), lambda b: np.log(b[:, 3] / b[:, 2]),
                 lambda b: (b[:, 2] == height).astype(float), lambda b: b[:, 0] / height):
        a, r = stat(ours), stat(ref)
        se = math.sqrt(a.var() / n + r.var() / n) + 1e-12
        assert abs(a.mean() - r.mean()) < 5 * se


# ----------------------------------------------------------------------------------------------- folders


def test_folder_listing_is_torchvisions_imagefolder(tmp_path):
    root = write_folder(tmp_path / "data", ["dog", "cat", "ant"])
    (root / "cat" / "nested").mkdir()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "cat" / "nested" / "grey.JPG", format="JPEG")
    (root / "dog" / "notes.txt").write_text("not an image")
    classes, paths, labels = folder.list_folder(root)
    ref = torchvision.datasets.ImageFolder(root)
    assert classes == ref.classes == ["ant", "cat", "dog"]
    assert list(zip(paths, labels)) == ref.samples


def test_a_symlink_to_a_parent_folder_lists_each_image_once(tmp_path):
    root = write_folder(tmp_path / "data", ["a", "b"])
    (root / "a" / "loop").symlink_to(root / "a")
    _, paths, labels = folder.list_folder(root)
    assert paths == [str(root / c / f"{k}.png") for c in "ab" for k in range(3)]
    assert labels == [0, 0, 0, 1, 1, 1]


def test_two_symlinks_to_parent_folders_finish_and_list_each_image_once(tmp_path):
    """os.walk following links would walk 2^40 paths here, to the path length limit."""
    root = write_folder(tmp_path / "data", ["a", "b"])
    (root / "a" / "sub").mkdir()
    (root / "a" / "sub" / "up").symlink_to(root / "a")
    (root / "a" / "sub" / "self").symlink_to(root / "a" / "sub")
    _, paths, labels = folder.list_folder(root)
    assert len(paths) == len(set(map(os.path.realpath, paths))) == 6 and labels == [0, 0, 0, 1, 1, 1]


def test_folder_with_train_and_val_labels_val_by_the_training_classes(tmp_path):
    write_folder(tmp_path / "train", ["a", "b", "c"])
    write_folder(tmp_path / "val", ["a", "c"], per_class=2)
    ds = data.load_images(f"folder:{tmp_path}")
    assert ds.classes == ["a", "b", "c"] and len(ds.train) == 9 and len(ds.val) == 4
    assert sorted({int(ds.val[i]["label"]) for i in range(4)}) == [0, 2]
    record = ds.val[0]
    assert record["image"].mode == "RGB" and record["index"] == 0


def test_held_out_fraction_is_seeded_disjoint_and_printed(tmp_path, capsys):
    root = write_folder(tmp_path / "data", ["a", "b"], per_class=10)
    ds = data.load_images(f"folder:{root}", seed=3)
    assert "holding out 0.1 of it (--val-fraction 0.1, --seed 3)" in capsys.readouterr().out
    train = {ds.train.describe(i) for i in range(len(ds.train))}
    val = {ds.val.describe(i) for i in range(len(ds.val))}
    assert len(val) == 2 and len(train) == 18 and not train & val
    again = data.load_images(f"folder:{root}", seed=3, val_fraction=0.1)
    assert {again.val.describe(i) for i in range(len(again.val))} == val
    other = data.load_images(f"folder:{root}", seed=4, val_fraction=0.5)
    assert len(other.val) == 10 and other.val[0]["index"] == 0


def test_evaluation_only_reads_the_val_folder_or_the_folder_itself(tmp_path):
    root = write_folder(tmp_path / "imagenet" / "val", ["n01440764", "n01443537"])
    ds = data.load_images(f"folder:{tmp_path / 'imagenet'}", evaluate_only=True)
    assert ds.train is None and len(ds.val) == 6 and ds.classes == ["n01440764", "n01443537"]
    assert len(data.load_images(f"folder:{root}", evaluate_only=True).val) == 6


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "no such directory"),
    (lambda root: root.mkdir(), "holds no class folders; expected torchvision's ImageFolder layout"),
    (lambda root: write_folder(root, ["only"]), r"has 1 class \(only\); a classifier needs at least 2"),
    (lambda root: (write_folder(root, ["a", "b"]), (root / "c").mkdir()), "class folders without images: c"),
    (lambda root: (write_folder(root / "train", ["a", "b"]), write_folder(root / "val", ["a", "z"])),
     "has classes the training images lack: z"),
])
def test_bad_folders_are_one_line_errors(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(data.DataError, match=message):
        data.load_images(f"folder:{root}")


def test_unknown_source_and_bad_fraction_name_what_to_do(tmp_path):
    with pytest.raises(data.DataError, match="choose one of folder:DIR, tfds:NAME"):
        data.load_images(str(tmp_path))
    write_folder(tmp_path / "d", ["a", "b"])
    with pytest.raises(data.DataError, match="holds out 0; choose a fraction"):
        data.load_images(f"folder:{tmp_path / 'd'}", val_fraction=0.01)


# ----------------------------------------------------------------------------------------------- tfds


def test_tfds_mock_rgb_and_grey_datasets_become_rgb_with_their_class_names(capsys):
    with tfds.testing.mock_data(num_examples=6):
        cifar = data.load_images("tfds:cifar10")
        mnist = data.load_images("tfds:mnist", val_fraction=0.5)
        assert "evaluating on its 'validation' split" in capsys.readouterr().out
        assert len(cifar.classes) == 10 and len(cifar.train) == 6
        assert cifar.val.describe(0) == "tfds:cifar10 validation[0]"
        for ds, side in ((cifar, 32), (mnist, 28)):
            record = ds.train[0]
            assert record["image"].mode == "RGB" and record["image"].size == (side, side)
        grey = np.asarray(mnist.train[0]["image"])
        np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
        assert len(mnist.train) == 3 and len(mnist.val) == 3


def test_tfds_not_prepared_is_one_line_without_a_download(tmp_path):
    with pytest.raises(data.DataError, match="is not prepared as array_record in .*tfds build cifar10"):
        data.load_images("tfds:cifar10", data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="TFDS has no dataset of that name"):
        data.load_images("tfds:no_such_dataset", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["huggingface:mnist", "kaggle:owner/set"])
def test_tfds_community_datasets_are_one_line_without_building_them(tmp_path, monkeypatch, name):
    """A community dataset (NAMESPACE:NAME) is code TFDS fetches and runs, and it may download: refused before
    TFDS builds anything."""
    monkeypatch.setattr(tfds, "builder", lambda *a, **k: pytest.fail("tfds.builder was called"))
    with pytest.raises(data.DataError, match=f"--data tfds:{name}: community datasets") as e:
        data.load_images(f"tfds:{name}", data_dir=str(tmp_path))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def folder_source(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("pipe") / "data", ["a", "b", "c"], per_class=7)
    classes, paths, labels = folder.list_folder(root)
    return folder.FolderSource(paths, labels)


def crops(source, start, stop, seed=0, workers=0):
    train = lambda r, rng: transforms.train_transform(r, rng, size=16)  # noqa: E731
    return [b for b in pipeline.train_batches(source, global_batch=4, seed=seed, start_step=start, stop_step=stop,
                                              random_transform=train, workers=workers)]


def test_random_crops_are_a_function_of_seed_and_step_so_resume_reads_the_same(folder_source):
    run = crops(folder_source, 0, 10)  # 21 images, 5 steps an epoch: two epochs
    assert len(run) == 10 and run[0]["image"].shape == (4, 16, 16, 3) and run[0]["mask"].all()
    resumed = crops(folder_source, 7, 10)
    for a, b in zip(run[7:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(run[0]["image"], crops(folder_source, 0, 1, seed=1)[0]["image"])


@pytest.mark.slow
def test_worker_processes_give_the_batches_threads_give(folder_source):
    for a, b in zip(crops(folder_source, 3, 6), crops(folder_source, 3, 6, workers=1)):
        for key in ("image", "label", "mask", "bad"):
            np.testing.assert_array_equal(a[key], b[key])


def test_an_unreadable_image_is_reported_once_and_skipped_or_stops(tmp_path, capsys):
    root = write_folder(tmp_path / "data", ["a", "b"], per_class=4)
    (root / "b" / "1.png").write_bytes((root / "b" / "1.png").read_bytes()[:60])  # truncated
    _, paths, labels = folder.list_folder(root)
    source = folder.FolderSource(paths, labels)
    evaluate = lambda r: transforms.eval_transform(r, size=16, resize_to=18)  # noqa: E731
    batches = lambda: pipeline.eval_batches(source, global_batch=3, transform=evaluate,  # noqa: E731
                                            blank=transforms.blank(16))
    skip = transforms.BadImages(source, stop=False)
    for _ in range(2):  # two passes, one report
        rows = [b for b in skip(batches())]
    err = capsys.readouterr().err
    assert err.count("cannot read the image") == 1 and f"{root / 'b' / '1.png'}: cannot read" in err
    mask = np.concatenate([b["mask"] for b in rows])
    assert mask.sum() == 7 and len(mask) == 9 and "bad" not in rows[0]
    with pytest.raises(data.DataError, match=r"1\.png: cannot read the image .*pass --bad-images skip"):
        list(transforms.BadImages(source, stop=True)(batches()))


def test_an_unreadable_image_in_a_training_batch_is_refilled_with_a_readable_one(tmp_path):
    """The skipped row counts for nothing in the loss (mask False) and, holding another image of its batch rather
    than a blank, shifts no BatchNorm statistics towards zero."""
    root = write_folder(tmp_path / "data", ["a", "b"], per_class=4)
    (root / "a" / "2.png").write_bytes(b"not an image")
    _, paths, labels = folder.list_folder(root)
    source = folder.FolderSource(paths, labels)
    train = lambda r, rng: transforms.train_transform(r, rng, size=8)  # noqa: E731
    [batch] = transforms.BadImages(source, stop=False)(
        pipeline.train_batches(source, global_batch=8, seed=0, start_step=0, stop_step=1, random_transform=train))
    assert batch["mask"].sum() == 7
    (bad,) = np.flatnonzero(~batch["mask"])
    readable = [batch["image"][i].tobytes() for i in np.flatnonzero(batch["mask"])]
    assert batch["image"][bad].any() and batch["image"][bad].tobytes() in readable


# ----------------------------------------------------------------------------------------------- hostile images


def test_the_folder_formats_are_pils_names_for_the_listed_extensions():
    registered = Image.registered_extensions()
    assert set(folder.FORMATS) == {registered[ext] for ext in folder.IMG_EXTENSIONS}


def test_an_image_is_decoded_only_as_a_format_its_folder_lists(tmp_path):
    """A GIF (or an EPS, which PIL hands to Ghostscript) named .png is not decoded by its content."""
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png", format="GIF")
    source = folder.FolderSource([str(tmp_path / "x.png")], [0])
    assert source[0]["image"] is None
    with pytest.raises(Image.UnidentifiedImageError):
        source.read(0)


# A 4x4 RGB TIFF written by PIL, three bytes changed by a seeded mutation: its StripOffsets tag now claims the
# DOUBLE type, and PIL's TIFF plugin raises TypeError ('float' object cannot be interpreted as an integer).
MUTATED_TIFF = bytes.fromhex(
    "49492a00080000000a00000104000100000004000000010104000100000004003600020103000300000086000000030103000100"
    "00000100000006010300010000000200000011010c00010000008c00000015010300010000000300000016010400010000000400"
    "00001701040001000000300000001c010300010000000100000000000000080008000800000102030405060708090a0b0c0d0e0f"
    "101112131415161718191a1b1c1d1e1f20212223242526272829392b2c2d2e2f")


def test_a_mutated_tiff_whose_decoder_raises_type_error_is_skipped_and_reported(tmp_path, capsys):
    (tmp_path / "broken.tif").write_bytes(MUTATED_TIFF)
    source = folder.FolderSource([str(tmp_path / "broken.tif")], [0])
    assert source[0]["image"] is None
    transforms.BadImages(source, stop=False).report(0)
    assert "cannot read the image (TypeError: 'float' object cannot be interpreted" in capsys.readouterr().err


@pytest.mark.parametrize("error", [TypeError, OverflowError, MemoryError, struct.error])
def test_any_decoder_exception_makes_an_unreadable_image(tmp_path, monkeypatch, capsys, error):
    """Mutated TIFFs raise TypeError or OverflowError from PIL's decoders; whatever it raises, the image is
    skipped and reported."""
    write_folder(tmp_path / "data", ["a", "b"], per_class=1)
    _, paths, labels = folder.list_folder(tmp_path / "data")
    source = folder.FolderSource(paths, labels)

    def broken(*args, **kwargs):
        raise error("broken")

    monkeypatch.setattr(Image.Image, "convert", broken)
    assert source[0]["image"] is None
    transforms.BadImages(source, stop=False).report(0)
    assert f"cannot read the image ({error.__name__}: broken); skipped" in capsys.readouterr().err


def test_the_decoded_size_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch, capsys):
    write_folder(tmp_path / "data", ["a", "b"], per_class=1, side=40)  # 40 x 40 = 1,600 pixels
    _, paths, labels = folder.list_folder(tmp_path / "data")
    assert folder.FolderSource(paths, labels, max_pixels=1600)[0]["image"].size == (40, 40)
    source = folder.FolderSource(paths, labels, max_pixels=1599)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image over the budget"))
    assert source[0]["image"] is None
    transforms.BadImages(source, stop=False).report(0)
    assert "40x40 = 1,600 pixels, more than the budget of 1,599" in capsys.readouterr().err


def png_claiming(path, width, height):
    """A 1x1 PNG whose header claims `width` x `height` pixels (its IHDR rewritten, checksum and all)."""
    Image.new("L", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


def test_a_raised_budget_reaches_past_pils_own_bomb_limit(tmp_path, monkeypatch, capsys):
    """20000 x 10000 is more than twice PIL's MAX_IMAGE_PIXELS: PIL refuses it on opening unless the budget
    says otherwise (the decoding itself stood in for: the file holds one pixel)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setattr(Image.Image, "convert", lambda self, mode: f"{self.width}x{self.height} decoded")
    png_claiming(tmp_path / "big.png", 20000, 10000)
    source = folder.FolderSource([str(tmp_path / "big.png")], [0])
    assert source[0]["image"] is None
    transforms.BadImages(source, stop=False).report(0)
    assert "cannot read the image (DecompressionBombError: " in capsys.readouterr().err
    raised = folder.FolderSource([str(tmp_path / "big.png")], [0], max_pixels=200_000_000)
    assert raised[0]["image"] == "20000x10000 decoded"


def test_load_images_passes_the_decoded_size_budget_to_the_folder(tmp_path):
    write_folder(tmp_path / "data", ["a", "b"], per_class=4)
    ds = data.load_images(f"folder:{tmp_path / 'data'}", val_fraction=0.5, max_pixels=123)
    assert ds.train.source.max_pixels == ds.val.source.max_pixels == 123
    assert data.load_images(f"folder:{tmp_path / 'data'}", val_fraction=0.5).train.source.max_pixels == \
        folder.MAX_PIXELS


def resizes(monkeypatch):
    """The sizes PIL is asked to resize to, call by call."""
    sizes, resize = [], Image.Image.resize

    def recorded(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    return sizes


def test_a_1x20000_image_is_resized_only_where_the_centre_crop_keeps_it(monkeypatch):
    """torchvision's Resize(256) would make it 5,120,000 x 256 (3.9 GB); only the crop's 224 x 224 are made."""
    sizes = resizes(monkeypatch)
    record = {"image": Image.new("RGB", (20000, 1), (10, 200, 30)), "label": 0, "index": 0}
    out = transforms.eval_transform(record, size=224, resize_to=256)["image"]
    assert out.shape == (224, 224, 3) and (out == (10, 200, 30)).all()
    assert sizes == [(224, 224)]


@pytest.mark.parametrize("name", PHOTOS)
def test_over_the_resize_budget_the_centre_crop_is_within_one_level_of_torchvisions(name, monkeypatch):
    """PIL's box= resize computes the kept pixels' filter centres from the box, not the whole image: the same
    weights to within float rounding, so a value may round to the next level (measured: on up to 4e-4 of them)."""
    image = photo(name)
    ref = np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(image)).astype(int)
    sizes = resizes(monkeypatch)
    ours = transforms.eval_transform({"image": image, "label": 0, "index": 0}, size=224, resize_to=256,
                                     max_resized_pixels=224 * 224)["image"]
    assert sizes == [(224, 224)] and np.abs(ours - ref).max() <= 1
