"""Datasets: the spec plugins register, and the fixed, seeded train / validation / test split.

Everything is held in memory as tensors: the datasets this tool targets are small, and
per-sample Python in a DataLoader costs more than the training step on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from autoshrink.errors import DataError
from autoshrink.imports import parameter_names


@dataclasses.dataclass(frozen=True)
class RawData:
    """What a dataset loader returns: images as (N, C, H, W) arrays (any numeric dtype).

    ``test_x``/``test_y`` are the official test split, or None when the dataset has none (the
    core then holds out a test split itself). ``scale`` maps pixel values to [0, 1].
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    num_classes: int
    scale: float = 1.0 / 255.0


    def check(self, name: str) -> None:
        """Refuse data the core would misread: a truncated or mixed-up file, labels that are
        not class numbers, missing pixel values, or images stored channels-last."""
        pairs = [("train", self.train_x, self.train_y)]
        if self.test_x is not None:
            pairs.append(("test", self.test_x, self.test_y))
        for split, x, y in pairs:
            problem = self._problem(split, np.asarray(x), None if y is None else np.asarray(y))
            if problem:
                raise DataError(f"dataset {name!r} is inconsistent: {problem}")

    def _problem(self, split: str, x: np.ndarray, y: np.ndarray | None) -> str | None:
        """What is wrong with one split's arrays, with the fix, or None."""
        files = "; check or replace its files"
        if x.ndim != 4:
            return f"{split} images have shape {x.shape}, not N x C x H x W{files}"
        if y is None or len(x) != len(y):
            return f"{len(x)} {split} images but {'no' if y is None else len(y)} labels{files}"
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            return f"{split} images are of type {x.dtype}, not numbers{files}"
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
            return (f"{split} labels are of type {y.dtype}, not class numbers; map them to"
                    " 0..num_classes-1 in the loader (np.unique(labels, return_inverse=True))")
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < self.num_classes:
            return (f"{split} labels run from {int(y.min())} to {int(y.max())}, outside"
                    f" 0..{self.num_classes - 1}{files}")
        channels, height, width = x.shape[1:]
        if width <= 4 < channels:
            return (f"{split} images have shape {x.shape}, which reads as {channels} channels"
                    f" of {height}x{width} pixels: they look stored as N x H x W x C; return"
                    " x.transpose(0, 3, 1, 2) from the loader")
        if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
            bad = int(np.count_nonzero(~np.isfinite(x).all(axis=(1, 2, 3))))
            return (f"{bad} of {len(x)} {split} images hold NaN or infinite pixel values; fix"
                    " or leave them out in the loader")
        return None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset. ``loader(data_dir)`` returns RawData or raises DataError; a loader
    that names ``input_size`` also gets ``--input-size`` (None when not given), for images that
    have no size of their own (a folder of photos)."""

    name: str
    loader: Callable[[Path | None], RawData]
    description: str = ""
    parametrised: bool = False  # name is a prefix: "imagefolder:<path>"


def read_dataset(spec: DatasetSpec, data_dir, input_size: int | None) -> RawData:
    """The spec's raw data, read at ``input_size`` where its loader can be told one."""
    sized = "input_size" in parameter_names(spec.loader)[0]
    raw = spec.loader(data_dir, input_size=input_size) if sized else spec.loader(data_dir)
    if not isinstance(raw, RawData):
        raise DataError(f"the loader of dataset {spec.name!r} returned {type(raw).__name__}, not"
                        " autoshrink.data.RawData; make it return RawData(train_x, train_y,"
                        " test_x, test_y, num_classes=...)")
    return raw


@dataclasses.dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32, N x C x H x W, normalised
    y: torch.Tensor  # int64

    def __len__(self) -> int:
        return len(self.y)

    def head(self, count: int) -> Split:
        """The first ``count`` samples; the split itself when it holds no more. The validation
        split is held out in random order (:func:`make_splits`), so its head is a fair sample
        of it."""
        return self if len(self) <= count else Split(self.x[:count], self.y[:count])

    def full_batches(self, size: int, limit: int | None = None) -> Iterator[torch.Tensor]:
        """The inputs in order, in batches of ``size`` (at most ``limit`` of them), leaving out
        a last partial batch; all of them as one batch when there are fewer than ``size``."""
        count = max(1, len(self) // size)
        for start in range(0, size * (count if limit is None else min(count, limit)), size):
            yield self.x[start:start + size]


@dataclasses.dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    num_classes: int
    # per-channel (mean, std), shape 1 x C x 1 x 1, that mapped [0, 1] pixels to the inputs
    normalisation: tuple[torch.Tensor, torch.Tensor] | None = None

    def pixel_value(self, value: float) -> torch.Tensor:
        """The input value of a pixel whose raw value is ``value`` (0 black, 1 white)."""
        if self.normalisation is None:
            return torch.tensor(value)
        mean, std = self.normalisation
        return (value - mean) / std

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    def with_train_subset(self, fraction: float, seed: int) -> Splits:
        """The same splits with a stratified ``fraction`` of the training data (a proxy task);
        validation and test stay whole, so proxy and full accuracies compare."""
        if fraction >= 1:
            return self
        from sklearn.model_selection import train_test_split  # slow to import: see make_splits

        index = np.arange(len(self.train))
        kept, _ = train_test_split(index, train_size=fraction, random_state=seed,
                                   stratify=self.train.y.numpy())
        kept = torch.as_tensor(np.sort(kept))
        return dataclasses.replace(self, train=Split(self.train.x[kept].contiguous(),
                                                     self.train.y[kept]))

    def fingerprint(self) -> str:
        """A short hash of the data, so a cached baseline is never reused for other data."""
        digest = hashlib.blake2b(digest_size=8)
        for split in (self.train, self.val, self.test):
            digest.update(split.x.numpy().tobytes())
            digest.update(split.y.numpy().tobytes())
        return digest.hexdigest()


def make_splits(raw: RawData, *, seed: int, val_fraction: float, input_size: int,
                in_channels: int | None = None) -> Splits:
    """Split, resize and normalise ``raw``; the split depends on ``seed`` only.

    Validation comes out of the training data (stratified); a dataset without an official test
    split gives up the same fraction again for the test split.
    """
    # imported here, not with the module: it takes over a second, and the commands that only
    # discover plugins (`plugins`, a name typed wrong) never split data
    from sklearn.model_selection import train_test_split

    def held_out(x, y, split):
        try:
            return train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
        except ValueError as error:  # too few images of a class to stratify
            rarest = np.unique(np.asarray(y), return_counts=True)[1].min()
            raise DataError(
                f"cannot hold out a {split} split of {val_fraction:.0%} with every class in it:"
                f" {len(y)} images, the rarest class has {rarest} ({error}); give the dataset"
                " more images of each class") from None

    train_x, train_y = raw.train_x, raw.train_y
    test_x, test_y = raw.test_x, raw.test_y
    if test_x is None:
        train_x, test_x, train_y, test_y = held_out(train_x, train_y, "test")
    train_x, val_x, train_y, val_y = held_out(train_x, train_y, "validation")

    prepared = [_prepare(x, raw.scale, input_size, in_channels) for x in (train_x, val_x, test_x)]
    # numpy, single-threaded in float64: the same bits on any number of threads, so worker
    # processes and other machines derive the very data (and task key) the parent did
    pixels = prepared[0].numpy()
    mean = torch.from_numpy(pixels.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64))
    std = torch.from_numpy(pixels.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64, ddof=1))
    mean, std = mean.float(), std.float().clamp_min(1e-6)
    x_train, x_val, x_test = ((x - mean) / std for x in prepared)
    as_labels = lambda y: torch.as_tensor(np.asarray(y), dtype=torch.int64)  # noqa: E731
    return Splits(
        train=Split(x_train.contiguous(), as_labels(train_y)),
        val=Split(x_val.contiguous(), as_labels(val_y)),
        test=Split(x_test.contiguous(), as_labels(test_y)),
        num_classes=raw.num_classes,
        normalisation=(mean, std),
    )


def _prepare(x: np.ndarray, scale: float, input_size: int,
             in_channels: int | None) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(x, dtype=np.float32)) * scale
    if tensor.shape[-1] != input_size or tensor.shape[-2] != input_size:
        tensor = F.interpolate(tensor, size=(input_size, input_size), mode="bilinear",
                               align_corners=False)
    if in_channels is not None and tensor.shape[1] != in_channels:
        if tensor.shape[1] == 1:
            tensor = tensor.expand(-1, in_channels, -1, -1)
        elif in_channels == 1:
            tensor = tensor.mean(dim=1, keepdim=True)
    return tensor
