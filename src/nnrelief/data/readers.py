"""Readers of the datasets' original distribution formats.

Every reader validates what it reads (headers, magic numbers, shapes, label ranges) and
raises :class:`DataFormatError` naming the file and the problem; a truncated or
corrupted file never yields a partial dataset.
"""

from __future__ import annotations

import codecs
import gzip
import logging
import math
import os
import pickle
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset import TensorDataset
from .errors import DataFormatError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR100_TRAIN_FILES = ("train",)
CIFAR100_TEST_FILES = ("test",)
TINY_IMAGENET_SIZE = 64


def _check_split(split: str, allowed: tuple[str, ...] = ("train", "test")) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def _read_maybe_gzip(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupted or truncated gzip stream ({exc})") from exc


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (as used by MNIST), gzip-compressed or not, into a numpy array.

    Raises:
        DataFormatError: bad magic number, truncated header or data, trailing bytes.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DataFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\0\0" or code not in _IDX_DTYPES or ndim == 0:
        raise DataFormatError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTDD with a "
            f"known type code TT and DD >= 1 dimensions); not an IDX file"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataFormatError(
            f"{path}: truncated IDX header ({len(raw)} bytes, {header_len} needed for "
            f"{ndim} dimensions)"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = _IDX_DTYPES[code]
    count = math.prod(dims)
    expected, actual = count * dtype.itemsize, len(raw) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes after the data"
        raise DataFormatError(
            f"{path}: {what}: header declares shape {dims} = {expected} data bytes, "
            f"file holds {actual}"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # copy: writable, native byte order


def read_mnist(
    images_path: PathLike,
    labels_path: PathLike,
    *,
    name: str = "mnist",
    split: str | None = None,
    num_classes: int = 10,
) -> TensorDataset:
    """Read an MNIST-style pair of IDX files (images idx3-ubyte, labels idx1-ubyte)."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataFormatError(
            f"{images_path}: expected uint8 images of shape (N, rows, cols), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataFormatError(
            f"{labels_path}: expected uint8 labels of shape (N,), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise DataFormatError(
            f"{labels_path}: label {int(labels.max())} outside [0, {num_classes})"
        )
    return TensorDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels).long(),
        num_classes=num_classes,
        name=name,
        split=split,
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a data file cannot run code."""

    _RECONSTRUCT = np.empty(0).__reduce__()[0]
    _SCALAR = np.int64(0).__reduce__()[0]
    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1 pickles
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2 pickles
        ("numpy.core.multiarray", "scalar"): _SCALAR,
        ("numpy._core.multiarray", "scalar"): _SCALAR,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles from Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR batch holds only "
                f"numpy arrays, lists, strings and numbers"
            ) from None


def _load_cifar_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupt pickles raise nearly any exception type
        raise DataFormatError(
            f"{path}: not a valid CIFAR python pickle ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def read_cifar_batch(
    path: PathLike, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch: uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    path = Path(path)
    batch = _load_cifar_pickle(path)
    for key in ("data", label_key):
        if key not in batch:
            raise DataFormatError(
                f"{path}: missing key {key!r} (keys present: {sorted(batch)})"
            )
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise DataFormatError(
            f"{path}: 'data' must be a uint8 array of shape (N, 3072), got "
            f"{type(data).__name__} {getattr(data, 'dtype', '')} of shape {shape}"
        )
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"{path}: {label_key!r} is not a list of integers") from exc
    if labels.shape != (len(data),):
        raise DataFormatError(
            f"{path}: {len(data)} images but {label_key!r} has shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(
            f"{path}: {label_key!r} spans [{labels.min()}, {labels.max()}], "
            f"outside [0, {num_classes})"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar(
    root: PathLike, files: tuple[str, ...], label_key: str, num_classes: int,
    name: str, split: str,
) -> TensorDataset:
    parts = [read_cifar_batch(Path(root) / f, label_key, num_classes) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels), num_classes,
                         name, split)


def read_cifar10(root: PathLike, split: str = "train") -> TensorDataset:
    """Read CIFAR-10 from a ``cifar-10-batches-py`` directory (python pickle batches)."""
    _check_split(split)
    files = CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES
    return _read_cifar(root, files, "labels", 10, "cifar10", split)


def read_cifar100(root: PathLike, split: str = "train") -> TensorDataset:
    """Read CIFAR-100 (fine labels) from a ``cifar-100-python`` directory."""
    _check_split(split)
    files = CIFAR100_TRAIN_FILES if split == "train" else CIFAR100_TEST_FILES
    return _read_cifar(root, files, "fine_labels", 100, "cifar100", split)


def _tiny_imagenet_items(root: Path, split: str, wnids: list[str]) -> list[tuple[Path, int]]:
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        items = []
        for wnid in wnids:
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise DataFormatError(f"{folder}: missing image folder of class {wnid}")
            files = sorted(folder.glob("*.JPEG"))
            if not files:
                raise DataFormatError(f"{folder}: no *.JPEG images for class {wnid}")
            items += [(f, index[wnid]) for f in files]
        return items
    annotations = root / "val" / "val_annotations.txt"
    items = []
    for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataFormatError(
                f"{annotations}:{lineno}: expected '<file>\\t<wnid>\\t...' with a wnid "
                f"listed in wnids.txt, got {line!r}"
            )
        items.append((root / "val" / "images" / fields[0], index[fields[1]]))
    if not items:
        raise DataFormatError(f"{annotations}: no annotations")
    return items


def read_tiny_imagenet(root: PathLike, split: str = "train") -> TensorDataset:
    """Read Tiny-ImageNet-200 from its ``tiny-imagenet-200`` directory (needs Pillow).

    ``split="test"`` reads the labelled ``val`` folder (the official test labels are not
    public). Class indices follow the sorted wnids, as torchvision's ``ImageFolder``.
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "Reading Tiny-ImageNet decodes JPEG files with Pillow, which is not installed: "
            "pip install pillow"
        ) from exc
    _check_split(split)
    root = Path(root)
    wnids_file = root / "wnids.txt"
    wnids = sorted(w.strip() for w in wnids_file.read_text().splitlines() if w.strip())
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataFormatError(f"{wnids_file}: expected a list of distinct wnids, one a line")
    items = _tiny_imagenet_items(root, split, wnids)
    size = TINY_IMAGENET_SIZE
    images = np.empty((len(items), size, size, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        path = items[i][0]
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
        except OSError as exc:  # missing file, unidentified or truncated image
            raise DataFormatError(f"{path}: cannot decode image ({exc})") from exc
        if array.shape != (size, size, 3):
            raise DataFormatError(f"{path}: image is {array.shape[1]}x{array.shape[0]}, "
                                  f"expected {size}x{size}")
        images[i] = array

    logger.info("decoding %d Tiny-ImageNet %s images from %s", len(items), split, root)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(items))))  # PIL releases the GIL while decoding
    labels = np.array([label for _, label in items], dtype=np.int64)
    return TensorDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                         torch.from_numpy(labels), len(wnids), "tiny-imagenet", split)
