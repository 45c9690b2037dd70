"""Built-in datasets. ``digits`` is embedded (scikit-learn); the others are read from disk.

Fashion-MNIST is found in Debian's ``dataset-fashion-mnist`` package folder, in ``--data-dir``,
or downloaded by torchvision when online; offline without files, one clear error says where to put
them. Nothing here is needed by the tests except ``digits``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from autoshrink import hookimpl
from autoshrink.data import DatasetSpec, RawData
from autoshrink.errors import DataError
from autoshrink.task import cache_root
from autoshrink_plugins.image_folder import load_imagefolder

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_digits(data_dir: Path | None) -> RawData:
    """scikit-learn's 8x8 handwritten digits (1,797 images, pixel values 0..16)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32)[:, None, :, :]
    return RawData(images, bunch.target.astype(np.int64), None, None, num_classes=10,
                   scale=1.0 / 16.0)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the MNIST family's format."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
            raise ValueError("bad magic number")
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path} is not a readable IDX file ({error}); re-download it or point"
                        " --data-dir at intact files") from None


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / "raw" / stem,
                      folder / "raw" / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def idx_dataset(name: str, torchvision_class: str, default_dirs: tuple[Path, ...] = ()):
    def load(data_dir: Path | None) -> RawData:
        folders = [data_dir] if data_dir else [*default_dirs, cache_root() / "data" / name]
        for folder in folders:
            found = [_find_idx(folder, stem) for stem in IDX_FILES]
            if all(found):
                arrays = [read_idx(p) for p in found]
                return RawData(arrays[0][:, None], arrays[1].astype(np.int64),
                               arrays[2][:, None], arrays[3].astype(np.int64), num_classes=10)
        target = folders[-1]
        _download(torchvision_class, target, name)
        return load(target / torchvision_class)

    return load


def _download(torchvision_class: str, root: Path, name: str, **kwargs):
    import torchvision

    try:
        return getattr(torchvision.datasets, torchvision_class)(str(root), download=True,
                                                                **kwargs)
    except Exception as error:
        raise DataError(
            f"dataset {name!r} is not on disk and could not be downloaded ({type(error).__name__});"
            f" put its files in {root} or pass --data-dir FOLDER"
            + (" (Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist"
               else "")) from None


def torchvision_dataset(name: str, torchvision_class: str, num_classes: int):
    def load(data_dir: Path | None) -> RawData:
        import torchvision

        root = data_dir or cache_root() / "data" / name
        cls = getattr(torchvision.datasets, torchvision_class)
        splits = []
        for train in (True, False):
            kwargs = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
            try:
                dataset = cls(str(root), download=False, **kwargs)
            except RuntimeError:
                dataset = _download(torchvision_class, root, name, **kwargs)
            images = np.asarray(dataset.data)
            if images.ndim == 4 and images.shape[-1] == 3:  # CIFAR stores N x H x W x C
                images = images.transpose(0, 3, 1, 2)
            labels = np.asarray(getattr(dataset, "targets", getattr(dataset, "labels", None)))
            splits += [images, labels.astype(np.int64)]
        return RawData(*splits, num_classes=num_classes)

    return load


@hookimpl
def register_datasets(register):
    register(DatasetSpec("digits", load_digits, "scikit-learn 8x8 digits, embedded (default)"))
    register(DatasetSpec("fashion-mnist", idx_dataset("fashion-mnist", "FashionMNIST",
                                                      (DEBIAN_FASHION_MNIST,)),
                         "Fashion-MNIST 28x28 (Debian package, --data-dir or download)"))
    register(DatasetSpec("mnist", idx_dataset("mnist", "MNIST"), "MNIST 28x28"))
    register(DatasetSpec("cifar10", torchvision_dataset("cifar10", "CIFAR10", 10),
                         "CIFAR-10 32x32 RGB (torchvision)"))
    register(DatasetSpec("cifar100", torchvision_dataset("cifar100", "CIFAR100", 100),
                         "CIFAR-100 32x32 RGB (torchvision)"))
    register(DatasetSpec("svhn", torchvision_dataset("svhn", "SVHN", 10),
                         "SVHN 32x32 RGB (torchvision)"))
    register(DatasetSpec("imagefolder", load_imagefolder,
                         "imagefolder:<path>, one subfolder per class, resized to 32x32 or"
                         " --input-size",
                         parametrised=True))
