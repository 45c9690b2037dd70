"""``imagefolder:<path>``: a folder of photos, one subfolder per class, held in memory: as
one channel where every image is grey (X-rays, scans; a third of the memory and of the first
layer's work), else as RGB. Grey images deeper than 8 bits (16-bit PNGs and TIFFs, float TIFFs)
are read as floats on the 8-bit scale, every level kept.

Photos are decoded at the size trained on (``--input-size``, else 32): JPEGs through PIL's
draft mode, which decodes a 3000x2250 photo at an eighth of its size in a quarter of the time
(37 against 154 ms here; the 32x32 result differs by a quarter of a grey level on average).
The decoded arrays (one channel for a grey folder) are cached under the autoshrink cache,
keyed by every file's path, size and modification time, so ``--n-jobs`` workers, ``report``,
``export`` and a resumed search load them in a moment instead of decoding the folder again.
A folder keeps one entry per size: a changed folder's new entry replaces the old one.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoshrink.data import RawData
from autoshrink.errors import DataError
from autoshrink.task import cache_root

if TYPE_CHECKING:
    import torch

log = logging.getLogger("autoshrink.datasets")  # under the logger the command line shows

PROGRESS_EVERY = 10_000  # images decoded between two progress lines
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                  ".gif")


def _hidden(name: str) -> bool:
    """A file or folder no one put there as data: hidden ones (.DS_Store, .ipynb_checkpoints,
    macOS's ._photo.jpg beside each photo copied to a foreign disk) and the __MACOSX folder
    of a zip made on a Mac, whose ._ files end in .jpg but hold no image."""
    return name.startswith(".") or name == "__MACOSX"


def _image_filter(folder: Path, left_out: collections.Counter):
    """ImageFolder's ``is_valid_file``: whether a file is an image we read, counting the others
    by suffix in ``left_out`` as the folder is walked (hidden files and whatever lies in
    hidden folders are left out without a word)."""

    def is_image(name: str) -> bool:
        path = Path(name)
        if any(_hidden(part) for part in path.relative_to(folder).parts):
            return False
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return True
        left_out[path.suffix.lower() or path.name] += 1
        return False

    return is_image


def _class_folders(folder: Path) -> tuple[list[str], dict[str, int]]:
    """ImageFolder's ``find_classes`` without hidden folders: a notebook's
    .ipynb_checkpoints was a class with no images, and the folder was refused."""
    classes = sorted(entry.name for entry in os.scandir(folder)
                     if entry.is_dir() and not _hidden(entry.name))
    if not classes:
        raise DataError(f"image folder {str(folder)!r} has no class folders; put the images"
                        " in one subfolder per class")
    return classes, {name: index for index, name in enumerate(classes)}


def _warn_left_out(folder: Path, left_out: collections.Counter) -> None:
    if left_out:
        kinds = ", ".join(f"{count} {suffix}" for suffix, count in left_out.most_common())
        count = sum(left_out.values())
        log.warning(f"image folder {str(folder)!r}: left out {count} file{'s' * (count > 1)}"
                    f" that {'are' if count > 1 else 'is'} not an image ({kinds}); images must"
                    f" end in {', '.join(IMAGE_SUFFIXES)}")


# grey images of more than 8 bits (PIL modes), and what maps their values to 0..255: 16-bit
# PNGs and TIFFs (X-rays, microscopy) count 0..65535 (PIL reads some as 32-bit "I"), float
# TIFFs 0..1. Converted to RGB, PIL clipped them at 255: a 12-bit scan came out 93 % white.
DEEP_GREY_TO_8_BIT = {**dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N", "I"), 255 / 65535),
                      "F": 255.0}


def _drafted(size: int):
    """A PIL loader that lets JPEG decoding skip the detail a ``size`` x ``size`` image
    cannot show (draft mode keeps at least ``size`` pixels on each side), and reads deep grey
    images as floats on the 0..255 scale of 8-bit ones, keeping every level they have. Photos
    are turned upright as their EXIF orientation says (phones store portraits as landscape
    pixels with a tag), as any viewer shows them."""
    from PIL import Image, ImageOps

    def load(path: str):
        with open(path, "rb") as handle:
            image = Image.open(handle)
            to_8_bit = DEEP_GREY_TO_8_BIT.get(image.mode)
            if to_8_bit is None:
                image.draft("RGB", (size, size))  # before decoding, which turning does
            image = ImageOps.exif_transpose(image)
            if to_8_bit is not None:
                return image.convert("F").point(lambda value: value * to_8_bit)
            return image.convert("RGB")

    return load


def _three_channels(image: torch.Tensor) -> torch.Tensor:
    """A deep grey image (one float channel) as three, like the 8-bit images PIL converts to
    RGB, so the two kinds stack in one folder (as floats)."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


DECODING = 4  # raised when decoding changes, so entries decoded before are not read again
# (2: deep grey images as floats, not clipped at 255; 3: photos turned upright by EXIF;
# 4: files that cannot be decoded are left out, and the entry says which)


def _cache_file(folder: Path, samples: list[tuple[str, int]], classes: list[str],
                size: int) -> Path:
    """Where the decoded images of exactly these files, at this size, are kept: named by the
    folder and size, then by every file's path, size and modification time."""
    entry = hashlib.sha256(json.dumps([str(folder.resolve()), size]).encode()).hexdigest()
    digest = hashlib.sha256(json.dumps([size, classes, DECODING]).encode())
    for path, label in samples:
        status = os.stat(path)
        digest.update(f"{path}\0{label}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return cache_root() / "imagefolder" / f"{entry[:12]}-{digest.hexdigest()[:20]}.npz"


def _store(cached: Path, images: np.ndarray, unreadable: list[int]) -> None:
    """Write the cache entry whole (workers may decode at once) and delete the entries of
    earlier versions of the same folder at the same size, which nothing reads again, and the
    half-written files of processes that were killed while writing one."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.stem}.{os.getpid()}{PARTIAL}")
    np.savez(partial, images=images, unreadable=np.asarray(unreadable, dtype=np.int64))
    partial.replace(cached)
    entry = cached.name.partition("-")[0]
    for stale in cached.parent.glob(f"{entry}-*.npz"):
        if stale != cached and not _being_written(stale):
            stale.unlink(missing_ok=True)


PARTIAL = ".partial.npz"  # <entry name>.<writer's process id>.partial.npz


def _being_written(path: Path) -> bool:
    """A partial file whose writer still runs (the cache is local to this machine)."""
    if not path.name.endswith(PARTIAL):
        return False
    try:
        os.kill(int(path.name.removesuffix(PARTIAL).rpartition(".")[2]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _decode(dataset) -> tuple[np.ndarray, list[int]]:
    """The images that decode, and the indexes of the samples that do not (a truncated
    download, a file that is no image despite its name): left out with a warning, so that one
    bad file in a large folder costs neither the whole folder nor a decoding pass per file."""
    from PIL import Image

    images, unreadable = [], []
    for index in range(len(dataset)):
        try:
            images.append(np.asarray(dataset[index][0]))
        except (OSError, ValueError, Image.DecompressionBombError):
            unreadable.append(index)
        if (index + 1) % PROGRESS_EVERY == 0:
            log.info(f"  read {index + 1:,} of {len(dataset):,} images")
    if not images:
        raise DataError(f"none of the {len(dataset):,} images under {dataset.root!r} could be"
                        " decoded; check that they are images in a format PIL reads")
    return np.stack(images), unreadable


def _warn_unreadable(folder: Path, samples: list[tuple[str, int]], unreadable: list[int]) -> None:
    if unreadable:
        named = [os.path.relpath(samples[index][0], folder) for index in unreadable[:3]]
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        log.warning(f"image folder {str(folder)!r}: left out {len(unreadable)} file"
                    f"{'s' * (len(unreadable) > 1)} that could not be decoded"
                    f" ({', '.join(named)}{more}); replace or remove "
                    f"{'them' if len(unreadable) > 1 else 'it'}")


def _one_channel_if_grey(images: np.ndarray) -> np.ndarray:
    """The images as one channel where every one has three equal channels (a model that
    insists on RGB gets it repeated by the core), checked a thousand images at a time (one
    comparison of a whole 96x96 folder of 50,000 would take a gigabyte)."""
    chunks = np.array_split(images, max(1, len(images) // 1000))
    grey = all(bool((chunk[:, 1:] == chunk[:, :1]).all()) for chunk in chunks)
    return images[:, :1] if grey else images


def load_imagefolder(path: str | Path, input_size: int | None = None) -> RawData:
    """Every image under ``path/<class>/``, resized to ``input_size`` square RGB (32 unless
    ``--input-size`` says). Read at the size trained on: resizing 32x32 images up to 96 would
    train on blurred photos."""
    import torchvision
    from torchvision import transforms

    size = input_size or 32
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist; use"
                        " imagefolder:/path/with/one/subfolder/per/class")

    class VisibleClasses(torchvision.datasets.ImageFolder):
        def find_classes(self, directory):
            return _class_folders(Path(directory))

    left_out = collections.Counter()
    try:
        dataset = VisibleClasses(
            str(folder), loader=_drafted(size),
            transform=transforms.Compose([transforms.Resize((size, size)),
                                          transforms.PILToTensor(), _three_channels]),
            is_valid_file=_image_filter(folder, left_out))
    except (FileNotFoundError, RuntimeError) as error:
        reason = str(error).strip().rstrip(".")
        raise DataError(f"cannot read image folder {str(folder)!r}: {reason}; remove the"
                        " folders without images or add some") from None
    _warn_left_out(folder, left_out)
    cached = _cache_file(folder, dataset.samples, dataset.classes, size)
    from_cache = cached.is_file()
    if from_cache:
        with np.load(cached) as stored:
            images, unreadable = stored["images"], stored["unreadable"].tolist()
    else:
        images, unreadable = _decode(dataset)
        images = _one_channel_if_grey(images)
        _store(cached, images, unreadable)
    _warn_unreadable(folder, dataset.samples, unreadable)
    labels = np.delete(np.asarray(dataset.targets, dtype=np.int64), unreadable)
    if empty := sorted(set(range(len(dataset.classes))) - set(labels.tolist())):
        names = ", ".join(repr(dataset.classes[index]) for index in empty)
        raise DataError(f"image folder {str(folder)!r}: no image of class folder {names} could"
                        " be decoded; replace its files or remove the folder")
    grey = images.shape[1] == 1
    log.info(f"read {len(images):,} {'grey ' if grey else ''}images of"
             f" {len(dataset.classes)} classes from {str(folder)!r} at {size}x{size}"
             f"{' (cached)' if from_cache else ''}")
    return RawData(images, labels, None, None, num_classes=len(dataset.classes))
