"""Dataset registry (files, official URLs, checksums, defaults) and :func:`load_dataset`."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .dataset import TensorDataset
from .download import DownloadError, extract_archive, fetch, verify_md5
from .errors import DataFormatError, DatasetNotFoundError
from .readers import (
    CIFAR10_TEST_FILES,
    CIFAR10_TRAIN_FILES,
    CIFAR100_TEST_FILES,
    CIFAR100_TRAIN_FILES,
    read_cifar10,
    read_cifar100,
    read_mnist,
    read_tiny_imagenet,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Download:
    """One file of an official distribution.

    Attributes:
        filename: name of the downloaded file.
        urls: official URL first, then mirrors; tried in order.
        md5: published md5 of the file.
        archive: extract it (its top-level folder is the dataset's ``install_dir``)
            instead of storing it as is.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str
    archive: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to find, fetch, check, read and preprocess one dataset.

    Attributes:
        name: registry key.
        num_classes: number of classes.
        image_shape: (C, H, W).
        num_samples: expected sample count per split; a mismatch is an error.
        split_files: files (relative to the dataset root) each split needs.
        search_dirs: subdirectories of ``data_dir`` that may be the dataset root
            ("" is ``data_dir`` itself), searched in order.
        install_dir: subdirectory of ``data_dir`` that downloads go to.
        downloads: files of the official distribution.
        reader: ``reader(root, split) -> TensorDataset``.
        normalize: default normalisation.
        augment: whether training uses crop + flip augmentation by default.
        val_size: default validation hold-out size (taken from the training split).
        packaged: the files ship inside this package (``data/sample``).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_samples: Mapping[str, int]
    split_files: Mapping[str, tuple[str, ...]]
    search_dirs: tuple[str, ...]
    install_dir: str
    downloads: tuple[Download, ...]
    reader: Callable[[Path, str], TensorDataset]
    normalize: Normalize
    augment: bool
    val_size: int
    packaged: bool = False
    file_md5: Mapping[str, str] = field(init=False)

    def __post_init__(self) -> None:
        md5s = {d.filename: d.md5 for d in self.downloads if not d.archive}
        object.__setattr__(self, "file_md5", md5s)


def _existing(path: Path) -> Path | None:
    """``path`` if it exists, else its uncompressed twin for a missing ``.gz``."""
    if path.exists():
        return path
    if path.suffix == ".gz" and path.with_suffix("").exists():
        return path.with_suffix("")
    return None


def _require(path: Path) -> Path:
    found = _existing(path)
    if found is None:
        raise DatasetNotFoundError(f"{path} not found")
    return found


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_MNIST_URLS = (
    "http://yann.lecun.com/exdb/mnist/",  # official; often refuses downloads nowadays
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's mirror of the same files
)


def _mnist_reader(name: str) -> Callable[[Path, str], TensorDataset]:
    def read(root: Path, split: str) -> TensorDataset:
        images, labels = (_require(root / f) for f in _MNIST_FILES[split])
        return read_mnist(images, labels, name=name, split=split)

    return read


_MNIST_NORMALIZE = Normalize()
_RGB_NORMALIZE = Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        num_classes=10,
        image_shape=(1, 28, 28),
        num_samples={"train": 60000, "test": 10000},
        split_files=_MNIST_FILES,
        search_dirs=("", "mnist", "MNIST/raw"),
        install_dir="mnist",
        downloads=tuple(
            Download(f, tuple(u + f for u in _MNIST_URLS), md5) for f, md5 in _MNIST_MD5.items()
        ),
        reader=_mnist_reader("mnist"),
        normalize=_MNIST_NORMALIZE,
        augment=False,
        val_size=5000,
    ),
    "mnist-sample": DatasetSpec(
        name="mnist-sample",
        num_classes=10,
        image_shape=(1, 28, 28),
        num_samples={"train": 6000, "test": 1000},
        split_files=_MNIST_FILES,
        search_dirs=(),
        install_dir="",
        downloads=(),
        reader=_mnist_reader("mnist-sample"),
        normalize=_MNIST_NORMALIZE,
        augment=False,
        val_size=1000,
        packaged=True,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        num_classes=10,
        image_shape=(3, 32, 32),
        num_samples={"train": 50000, "test": 10000},
        split_files={"train": CIFAR10_TRAIN_FILES, "test": CIFAR10_TEST_FILES},
        search_dirs=("cifar-10-batches-py", ""),
        install_dir="cifar-10-batches-py",
        downloads=(
            Download(
                "cifar-10-python.tar.gz",
                ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                "c58f30108f718f92721af3b95e74349a",
                archive=True,
            ),
        ),
        reader=read_cifar10,
        normalize=_RGB_NORMALIZE,
        augment=True,
        val_size=5000,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        num_classes=100,
        image_shape=(3, 32, 32),
        num_samples={"train": 50000, "test": 10000},
        split_files={"train": CIFAR100_TRAIN_FILES, "test": CIFAR100_TEST_FILES},
        search_dirs=("cifar-100-python", ""),
        install_dir="cifar-100-python",
        downloads=(
            Download(
                "cifar-100-python.tar.gz",
                ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                "eb9058c3a382ffc7106e4002c42a8d85",
                archive=True,
            ),
        ),
        reader=read_cifar100,
        normalize=_RGB_NORMALIZE,
        augment=True,
        val_size=5000,
    ),
    "tiny-imagenet": DatasetSpec(
        name="tiny-imagenet",
        num_classes=200,
        image_shape=(3, 64, 64),
        num_samples={"train": 100000, "test": 10000},
        split_files={
            "train": ("wnids.txt", "train"),
            "test": ("wnids.txt", "val/val_annotations.txt", "val/images"),
        },
        search_dirs=("tiny-imagenet-200", ""),
        install_dir="tiny-imagenet-200",
        downloads=(
            Download(
                "tiny-imagenet-200.zip",
                ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
                "90528d7ca1a48142e341f4ef8d21d0de",
                archive=True,
            ),
        ),
        reader=read_tiny_imagenet,
        normalize=_RGB_NORMALIZE,
        augment=True,
        val_size=10000,
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name``; raises ``KeyError`` listing the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None


def _find_root(spec: DatasetSpec, data_dir: Path, split: str) -> Path | None:
    for sub in spec.search_dirs:
        root = data_dir / sub
        if all(_existing(root / f) is not None for f in spec.split_files[split]):
            return root
    return None


def _downloads_for(spec: DatasetSpec, split: str) -> list[Download]:
    return [d for d in spec.downloads if d.archive or d.filename in spec.split_files[split]]


def _not_found_message(spec: DatasetSpec, data_dir: Path, split: str, reason: str) -> str:
    searched = ", ".join(str(data_dir / s) for s in spec.search_dirs)
    files = ", ".join(spec.split_files[split])
    urls = "; ".join(f"{' or '.join(d.urls)} (md5 {d.md5})" for d in _downloads_for(spec, split))
    if spec.downloads and spec.downloads[0].archive:
        how = f"extract it into {data_dir}"
    else:
        how = f"save the files in {data_dir / spec.install_dir}"
    return (
        f"dataset {spec.name!r} ({split} split) not found: expected files [{files}] in one "
        f"of: {searched}. {reason}. To fetch by hand, download {urls} and {how}."
    )


def _download(spec: DatasetSpec, data_dir: Path, split: str) -> None:
    """Fetch the official files, check their md5 and move them into place atomically."""
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / spec.install_dir
    for item in _downloads_for(spec, split):
        if not item.archive and (target / item.filename).exists():
            continue
        if item.archive and target.exists() and any(target.iterdir()):
            raise DatasetNotFoundError(_not_found_message(
                spec, data_dir, split,
                f"{target} exists but is incomplete; remove it to download again"))
        try:
            tmp = fetch(item.urls, item.md5, data_dir)
        except DownloadError as exc:
            raise DatasetNotFoundError(
                _not_found_message(spec, data_dir, split, f"Download failed ({exc})")
            ) from exc
        try:
            if item.archive:
                _install_archive(tmp, data_dir, target)
            else:
                target.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target / item.filename)
        finally:
            tmp.unlink(missing_ok=True)


def _install_archive(archive: Path, data_dir: Path, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(dir=data_dir, prefix=".extract-"))
    try:
        extract_archive(archive, staging)
        extracted = staging / target.name
        if not extracted.is_dir():
            raise DataFormatError(
                f"{archive}: archive has no top-level folder {target.name!r} "
                f"(found {sorted(p.name for p in staging.iterdir())})"
            )
        if target.exists():
            target.rmdir()  # empty (checked by the caller)
        os.replace(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_packaged(spec: DatasetSpec, split: str) -> TensorDataset:
    sample = resources.files(__package__).joinpath("sample")
    with ExitStack() as stack:
        images, labels = (
            stack.enter_context(resources.as_file(sample.joinpath(f)))
            for f in spec.split_files[split]
        )
        return read_mnist(images, labels, name=spec.name, split=split,
                          num_classes=spec.num_classes)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
    download: bool = True,
) -> TensorDataset:
    """Load a whole split of a registered dataset into memory.

    Looks for the original files under ``data_dir`` (see :attr:`DatasetSpec.search_dirs`);
    when missing and ``download`` is true, downloads the official distribution, checks
    its md5 and installs it in ``data_dir``. Files with a known md5 (MNIST) are verified
    on every load. ``"mnist-sample"`` ships with the package and needs no ``data_dir``.

    Raises:
        DatasetNotFoundError: files missing (the message names them, the directories
            searched and the URL to fetch them from by hand).
        ChecksumError: a file's md5 differs from the published one.
        DataFormatError: a file is truncated, corrupted or holds the wrong sample count.
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    start = time.perf_counter()
    if spec.packaged:
        dataset = _read_packaged(spec, split)
        source = f"package data of {__package__}"
    else:
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs the folder of its files: give --data-dir DIR (data_dir= in Python)")
        data_dir = Path(data_dir).expanduser()
        root = _find_root(spec, data_dir, split)
        if root is None:
            if not download:
                raise DatasetNotFoundError(
                    _not_found_message(spec, data_dir, split, "download=False"))
            _download(spec, data_dir, split)
            root = _find_root(spec, data_dir, split)
            if root is None:
                raise DatasetNotFoundError(_not_found_message(
                    spec, data_dir, split, "The downloaded distribution lacks them"))
        for f in spec.split_files[split]:
            if f in spec.file_md5 and (root / f).exists():
                verify_md5(root / f, spec.file_md5[f])
        dataset = spec.reader(root, split)
        source = str(root)
    expected = spec.num_samples[split]
    if dataset.image_shape != spec.image_shape:
        raise DataFormatError(
            f"{name} ({split}) read from {source} has images of shape "
            f"{dataset.image_shape}, expected {spec.image_shape}"
        )
    if len(dataset) != expected:
        raise DataFormatError(
            f"{name} ({split}) read from {source} has {len(dataset)} samples, the "
            f"distribution has {expected}: files incomplete or modified"
        )
    logger.info("loaded %s %s: %d samples from %s in %.2f s", name, split, len(dataset),
                source, time.perf_counter() - start)
    return dataset
