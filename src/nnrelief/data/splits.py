"""Reproducible subsets: validation hold-out and pruning sets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ._seed import seeded_generator
from .dataset import TensorDataset
from .registry import DATASETS


def subset(dataset: TensorDataset, indices: torch.Tensor | Sequence[int]) -> TensorDataset:
    """A new dataset holding copies of the samples at ``indices`` (same name and split)."""
    index = torch.as_tensor(indices, dtype=torch.long)
    if index.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(dataset)):
        raise IndexError(
            f"indices span [{int(index.min())}, {int(index.max())}], dataset "
            f"{dataset.name} has {len(dataset)} samples"
        )
    index = index.to(dataset.images.device)
    return TensorDataset(dataset.images[index], dataset.labels[index],
                         dataset.num_classes, dataset.name, dataset.split)


def _refuse_test(dataset: TensorDataset, what: str) -> None:
    if dataset.split == "test":
        raise ValueError(
            f"{what} must come from the training data, got the test split of {dataset.name}"
        )


def train_val_split(
    dataset: TensorDataset, val_size: int | None = None, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Hold out a random validation set from the training data.

    Args:
        dataset: training data (a dataset marked as the test split is refused).
        val_size: validation samples; default: the registry's value for
            ``dataset.name`` (5000 for MNIST/CIFAR, 10000 for Tiny-ImageNet).
        seed: the split depends only on this seed and the dataset size.

    Returns:
        (train, val), disjoint, both in the original sample order.
    """
    _refuse_test(dataset, "a validation set")
    if val_size is None:
        if dataset.name not in DATASETS:
            raise ValueError(f"no default val_size for dataset {dataset.name!r}; pass one")
        val_size = DATASETS[dataset.name].val_size
    if not 0 < val_size < len(dataset):
        raise ValueError(f"val_size must be in (0, {len(dataset)}), got {val_size}")
    order = torch.randperm(len(dataset), generator=seeded_generator("val-split", seed))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    return (replace(subset(dataset, train_idx), split="train"),
            replace(subset(dataset, val_idx), split="val"))


def sample_pruning_set(dataset: TensorDataset, n: int = 1000, seed: int = 0) -> TensorDataset:
    """Draw ``n`` distinct samples (the paper's default is 1000) reproducibly from ``seed``."""
    _refuse_test(dataset, "the pruning set")
    if not 0 < n <= len(dataset):
        raise ValueError(f"n must be in (0, {len(dataset)}], got {n}")
    order = torch.randperm(len(dataset), generator=seeded_generator("pruning-set", seed))
    return subset(dataset, order[:n].sort().values)
