"""Datasets in their original formats, held in memory and batched on the device.

Typical use::

    from nnrelief import data
    train = data.load_dataset("cifar10", "~/data", split="train")
    train, val = data.train_val_split(train, seed=0)
    spec = data.get_spec("cifar10")
    loader = data.BatchLoader(train, 128, shuffle=True, seed=0, augment=spec.augment)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            ...

A text corpus (``"shakespeare"``) loads as a :class:`TokenStream` of byte tokens per split
(``"train"``, ``"val"``, ``"test"``: whole works) and is batched by :class:`SequenceLoader`
into ``(inputs, next-token targets)`` windows.
"""

from .dataset import TensorDataset
from .download import md5sum
from .errors import ChecksumError, DataFormatError, DatasetNotFoundError
from .loader import BatchLoader, default_normalize
from .readers import (
    read_cifar10,
    read_cifar100,
    read_cifar_batch,
    read_idx,
    read_mnist,
    read_tiny_imagenet,
)
from .registry import DATASETS, TASKS, DatasetSpec, Download, get_spec, load_dataset
from .sequences import SequenceLoader
from .splits import sample_pruning_set, subset, train_val_split
from .text import BYTE_VOCAB, TokenStream, read_works, windows
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, random_crop_flip

__all__ = [
    "BYTE_VOCAB",
    "BatchLoader",
    "ChecksumError",
    "DATASETS",
    "DataFormatError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "Download",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalize",
    "SequenceLoader",
    "TASKS",
    "TensorDataset",
    "TokenStream",
    "default_normalize",
    "get_spec",
    "load_dataset",
    "md5sum",
    "random_crop_flip",
    "read_cifar10",
    "read_cifar100",
    "read_cifar_batch",
    "read_idx",
    "read_mnist",
    "read_tiny_imagenet",
    "read_works",
    "sample_pruning_set",
    "subset",
    "train_val_split",
    "windows",
]
