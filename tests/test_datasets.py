"""Dataset loaders and the fixed split, on small files made by the tests."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from autoshrink.data import RawData, make_splits
from autoshrink.errors import DataError
from autoshrink_plugins.datasets import IDX_FILES, load_digits, read_idx


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_are_read_from_a_data_dir(host, tmp_path):
    rng = np.random.default_rng(0)
    for stem, shape in zip(IDX_FILES, [(60, 28, 28), (60,), (20, 28, 28), (20,)]):
        high = 10 if len(shape) == 1 else 256
        _write_idx(tmp_path / f"{stem}.gz", rng.integers(0, high, shape))
    spec, _ = host.dataset("fashion-mnist")
    raw = spec.loader(tmp_path)
    assert raw.train_x.shape == (60, 1, 28, 28) and raw.test_x.shape == (20, 1, 28, 28)
    assert raw.num_classes == 10


def test_corrupt_idx_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable IDX file"):
        read_idx(bad)


def test_imagefolder_loads_classes_from_subfolders(host, tmp_path):
    for label, colour in (("cat", 40), ("dog", 200)):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (20 + i, 24), (colour, i, 0)).save(tmp_path / label / f"{i}.png")
    spec, argument = host.dataset(f"imagefolder:{tmp_path}")
    raw = spec.loader(argument)
    assert raw.train_x.shape == (10, 3, 32, 32) and raw.num_classes == 2
    assert sorted(set(raw.train_y.tolist())) == [0, 1]


def test_imagefolder_keeps_the_levels_of_16_bit_grey_images(host, tmp_path):
    """PIL clipped 16-bit values at 255 as it converted them to RGB: a 12-bit scan (0..4095)
    came out 93 % white, and a dim class looked like a bright one. An 8-bit image in the same
    folder keeps its own scale (white is white)."""
    rng = np.random.default_rng(0)
    for label, top in (("bright", 4096), ("dim", 2048)):
        (tmp_path / label).mkdir()
        for i in range(4):
            pixels = rng.integers(top // 2, top, (32, 32)).astype(np.uint16)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "bright" / "8-bit.png")
    spec, argument = host.dataset(f"imagefolder:{tmp_path}")
    raw = spec.loader(argument)
    x, y = raw.train_x, raw.train_y
    assert x.shape == (9, 1, 32, 32)  # grey: one channel
    to_8_bit = 255 / 65535
    white = (x == 255).all(axis=(1, 2, 3))
    assert white.sum() == 1 and y[white].tolist() == [0]
    bright, dim = x[(y == 0) & ~white], x[y == 1]
    assert 1024 * to_8_bit <= dim.min() and dim.max() < 2048 * to_8_bit <= bright.min()
    assert bright.max() < 4096 * to_8_bit
    assert len(np.unique(dim)) > 1000  # every level kept, not rounded to 8 bits


def test_imagefolder_turns_photos_upright_as_their_exif_orientation_says(host, tmp_path):
    """A phone stores a portrait as landscape pixels tagged "turn 90 degrees clockwise"; read
    without the tag, its top half came out as its left half."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, 30:] = 255  # as stored: left black, right white
    for label in ("portrait", "other"):
        (tmp_path / label).mkdir()
        for i in range(3):
            photo = Image.fromarray(pixels)
            exif = photo.getexif()
            exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to show
            photo.save(tmp_path / label / f"{i}.jpg", exif=exif)
    spec, argument = host.dataset(f"imagefolder:{tmp_path}")
    image = spec.loader(argument).train_x[0, 0].astype(float)  # grey: one channel
    assert image[:12].mean() < 10 and image[-12:].mean() > 245  # upright: top black, bottom white


def test_imagefolder_leaves_out_hidden_files_and_folders(host, tmp_path):
    """A zip made on a Mac holds __MACOSX/ with a ._ file for each photo, which ends in .jpg
    but is no image, and a notebook leaves .ipynb_checkpoints: the folder was refused (a class
    without images, then a file that could not be read)."""
    from autoshrink.errors import DataError

    for label in ("cat", "dog"):
        (tmp_path / label / ".thumbnails").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (80 * i, 0, 0)).save(tmp_path / label / f"{i}.png")
            (tmp_path / label / f"._{i}.png").write_bytes(b"\0\5\26\7 AppleDouble")
        Image.new("RGB", (8, 8)).save(tmp_path / label / ".thumbnails" / "0.png")
    (tmp_path / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    spec, argument = host.dataset(f"imagefolder:{tmp_path}")
    raw = spec.loader(argument)
    assert raw.num_classes == 2 and raw.train_x.shape[0] == 6

    empty = tmp_path / "flat"
    empty.mkdir()
    Image.new("RGB", (8, 8)).save(empty / "0.png")
    with pytest.raises(DataError, match="has no class folders; put the images in one subfolder"):
        spec.loader(str(empty))


def test_imagefolder_reads_at_the_input_size_and_names_the_files_it_left_out(host, tmp_path,
                                                                             caplog):
    """Photos are read at ``--input-size`` (not at 32 and resized again), GIFs count as
    images, and other files are named in a warning rather than dropped unseen."""
    import logging

    from autoshrink.data import read_dataset

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(4):
            Image.new("RGB", (60, 40 + i), (10 * i, 0, 0)).save(tmp_path / label / f"{i}.jpg")
        Image.new("P", (30, 30)).save(tmp_path / label / "4.gif")
    (tmp_path / "cat" / "notes.txt").write_text("taken in May")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0")
    spec, argument = host.dataset(f"imagefolder:{tmp_path}")
    with caplog.at_level(logging.INFO, logger="autoshrink"):
        raw = read_dataset(spec, argument, 48)
    assert raw.train_x.shape == (10, 3, 48, 48)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "left out 1 file that is not an image (1 .txt)" in warnings[0]
    assert read_dataset(spec, argument, None).train_x.shape == (10, 3, 32, 32)


def photo_folder(tmp_path, size: tuple[int, int]):
    """``photos/cat`` and ``photos/dog`` under ``tmp_path``, three JPEGs of ``size`` each."""
    photos = tmp_path / "photos"
    for label, colour in (("cat", 40), ("dog", 200)):
        (photos / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", size, (colour, 10 * i, 0)).save(photos / label / f"{i}.jpg")
    return photos


def test_imagefolder_decodes_a_folder_once_until_its_files_change(tmp_path, monkeypatch):
    """Workers, report and export read the decoded arrays from the cache; a changed photo
    is decoded again, and its entry replaces the folder's old one at that size."""
    import autoshrink_plugins.image_folder as image_folder

    monkeypatch.setenv("AUTOSHRINK_CACHE_DIR", str(tmp_path / "cache"))
    photos = photo_folder(tmp_path, (300, 200))
    first = image_folder.load_imagefolder(photos, 24)
    decoded = []
    monkeypatch.setattr(image_folder, "_decode",
                        lambda dataset: decoded.append(len(dataset)) or (np.zeros((6, 3, 24, 24)),
                                                                         []))
    again = image_folder.load_imagefolder(photos, 24)
    assert decoded == [] and np.array_equal(again.train_x, first.train_x)
    assert again.train_x.shape == (6, 3, 24, 24) and again.train_y.tolist() == [0] * 3 + [1] * 3
    Image.new("RGB", (300, 201), (0, 0, 0)).save(photos / "dog" / "2.jpg")
    # half-written entries of the folder at this size: one by a process that was killed,
    # one by a process still writing it
    cache = tmp_path / "cache" / "imagefolder"
    entry = next(cache.glob("*.npz")).name.partition("-")[0]
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    killed = cache / f"{entry}-0123.{int(finished.stdout)}.partial.npz"
    running = cache / f"{entry}-4567.{os.getpid()}.partial.npz"
    killed.write_bytes(b"half"), running.write_bytes(b"half")
    image_folder.load_imagefolder(photos, 24)
    image_folder.load_imagefolder(photos, 32)  # another size is another entry
    assert decoded == [6, 6]
    assert not killed.exists() and running.exists()
    assert len(list(cache.glob("*.npz"))) == 3


def test_imagefolder_leaves_out_files_that_cannot_be_decoded_and_names_them(
        tmp_path, monkeypatch, caplog):
    """One broken file stopped the whole folder, after decoding every image before it and
    caching nothing, so each bad file found cost another pass; now they are left out and named,
    and the cached entry remembers which, so a resumed search reads the same images."""
    import logging

    import autoshrink_plugins.image_folder as image_folder

    monkeypatch.setenv("AUTOSHRINK_CACHE_DIR", str(tmp_path / "cache"))
    photos = photo_folder(tmp_path, (30, 30))
    (photos / "cat" / "3.png").write_bytes(b"an error page saved as a png")
    whole = (photos / "dog" / "0.jpg").read_bytes()
    (photos / "dog" / "3.jpg").write_bytes(whole[:len(whole) // 2])  # a download cut short
    for attempt in ("decoded", "cached"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="autoshrink"):
            raw = image_folder.load_imagefolder(photos, 16)
        assert raw.train_x.shape == (6, 3, 16, 16), attempt
        assert raw.train_y.tolist() == [0] * 3 + [1] * 3
        assert [r.getMessage() for r in caplog.records] == [
            f"image folder {str(photos)!r}: left out 2 files that could not be decoded"
            " (cat/3.png, dog/3.jpg); replace or remove them"]

    for path in (photos / "cat").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(DataError, match="no image of class folder 'cat' could be decoded"):
        image_folder.load_imagefolder(photos, 16)  # not a search with one class never seen
    for path in (photos / "dog").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(DataError, match="none of the 8 images under .* could be decoded"):
        image_folder.load_imagefolder(photos, 16)


def test_imagefolder_holds_grey_photos_as_one_channel(tmp_path):
    """Grey scans saved as greyscale or as RGB with equal channels: one channel, a third of
    the memory (the core repeats it for a model that insists on RGB); one coloured image
    keeps the folder RGB."""
    from autoshrink_plugins.image_folder import load_imagefolder

    for label, level in (("normal", 60), ("opacity", 190)):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("L", (40, 40), level + i).save(tmp_path / label / f"{i}.png")
        Image.new("RGB", (40, 40), (level,) * 3).save(tmp_path / label / "rgb.png")
    grey = load_imagefolder(tmp_path, 16)
    assert grey.train_x.shape == (8, 1, 16, 16)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "normal" / "red.png")
    assert load_imagefolder(tmp_path, 16).train_x.shape == (9, 3, 16, 16)


def test_splits_are_fixed_by_seed_and_disjoint():
    raw = load_digits(None)
    first = make_splits(raw, seed=3, val_fraction=0.2, input_size=16)
    again = make_splits(raw, seed=3, val_fraction=0.2, input_size=16)
    other = make_splits(raw, seed=4, val_fraction=0.2, input_size=16)
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    sizes = [len(first.train), len(first.val), len(first.test)]
    assert sum(sizes) == 1797 and first.input_shape == (1, 16, 16)
    assert abs(float(first.train.x.mean())) < 1e-4  # normalised on the training split


def test_splits_are_the_same_bits_on_any_number_of_threads():
    """Worker processes (one thread each) must derive the very data the parent (every core)
    did, or the study refuses them as another task."""
    rng = np.random.default_rng(0)
    raw = RawData(train_x=rng.random((6000, 1, 28, 28), dtype=np.float32), scale=1.0,
                  train_y=np.arange(6000) % 10, test_x=None, test_y=None, num_classes=10)
    fingerprints = set()
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            splits = make_splits(raw, seed=0, val_fraction=0.2, input_size=28)
            fingerprints.add(splits.fingerprint())
    finally:
        torch.set_num_threads(threads)
    assert len(fingerprints) == 1


def _raw(x, y, num_classes=4):
    return RawData(train_x=x, train_y=y, test_x=None, test_y=None, num_classes=num_classes)


_IMAGES = np.zeros((40, 1, 12, 12), dtype=np.float32)
_LABELS = np.arange(40) % 4
_NAN = _IMAGES.copy()
_NAN[3, 0, 5, 5] = np.nan


@pytest.mark.parametrize("raw, message", [
    (_raw(_IMAGES, _LABELS + 1), "train labels run from 1 to 4, outside 0..3"),
    (_raw(_IMAGES, np.array(list("abcd") * 10)), "labels are of type <U1, not class numbers"),
    (_raw(_IMAGES, _LABELS.astype(float)), "labels are of type float64, not class numbers"),
    (_raw(_IMAGES.transpose(0, 2, 3, 1), _LABELS), "look stored as N x H x W x C"),
    (_raw(np.zeros((40, 3, 8, 8), dtype=object), _LABELS), "images are of type object"),
    (_raw(_NAN, _LABELS), "1 of 40 train images hold NaN or infinite pixel values"),
])
def test_data_the_core_would_misread_is_refused_with_the_fix(raw, message):
    with pytest.raises(DataError, match=message):
        raw.check("wafers")


def test_data_of_every_numeric_kind_is_accepted():
    for images in (_IMAGES, _IMAGES.astype(np.uint8), _IMAGES.astype(np.float64) + 0.5,
                   _IMAGES.astype(bool), _IMAGES[:, :, :, :3]):
        _raw(images, _LABELS.astype(np.uint8)).check("wafers")


def test_too_few_images_of_a_class_to_hold_out_splits_is_a_clear_error():
    with pytest.raises(DataError, match="cannot hold out a test split of 20% with every class"
                                        " in it: 10 images, the rarest class has 2"):
        make_splits(_raw(_IMAGES[:10], _LABELS[:10]), seed=0, val_fraction=0.2,
                    input_size=12)


def test_images_that_are_not_square_are_stretched_with_a_warning(tmp_path, caplog):
    from autoshrink.config import build_config
    from autoshrink.plugins import PluginHost
    from autoshrink.task import load_task

    plugin = tmp_path / "wide_images.py"
    plugin.write_text(
        "import numpy as np\n"
        "from autoshrink import hookimpl\n"
        "from autoshrink.data import DatasetSpec, RawData\n"
        "def load(data_dir):\n"
        "    x = np.random.default_rng(0).random((200, 1, 10, 14))\n"
        "    return RawData(x, np.arange(200) % 4, None, None, num_classes=4, scale=1.0)\n"
        "@hookimpl\n"
        "def register_datasets(register):\n"
        "    register(DatasetSpec('wide', load))\n")
    host = PluginHost.discover(explicit=(str(plugin),))
    task = load_task(build_config(None, {"dataset": "wide"}), host)
    assert task.input_shape == (1, 16, 16)
    assert "the images are 10x14 pixels and the models take squares" in caplog.text


def test_a_dataset_plugin_whose_loader_fails_is_told_the_fix(tmp_path):
    from autoshrink.config import build_config
    from autoshrink.errors import DataError
    from autoshrink.plugins import PluginHost
    from autoshrink.task import load_task

    plugin = tmp_path / "arrays.py"
    plugin.write_text(
        "import numpy as np\n"
        "from autoshrink import hookimpl\n"
        "from autoshrink.data import DatasetSpec\n"
        "def from_files(data_dir):\n"
        "    return np.load(f'{data_dir}/x.npy')\n"
        "def as_dict(data_dir):\n"
        "    return {'x': np.zeros((10, 1, 8, 8)), 'y': np.zeros(10)}\n"
        "@hookimpl\n"
        "def register_datasets(register):\n"
        "    register(DatasetSpec('files', from_files))\n"
        "    register(DatasetSpec('dict', as_dict))\n")
    host = PluginHost.discover(explicit=(str(plugin),))
    # it read "No such file ... 'None/x.npy'; check or replace its files"
    with pytest.raises(DataError, match="given no folder: pass the one holding its files with"
                                        " --data-dir"):
        load_task(build_config(None, {"dataset": "files"}), host)
    with pytest.raises(DataError, match="the loader of dataset 'dict' returned dict, not"
                                        r" autoshrink.data.RawData; make it return RawData\("):
        load_task(build_config(None, {"dataset": "dict"}), host)  # an AttributeError before
