"""The in-memory dataset container shared by all readers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class TensorDataset:
    """A whole image-classification dataset held as two tensors.

    Attributes:
        images: uint8 tensor of shape (N, C, H, W), raw pixel values.
        labels: int64 tensor of shape (N,), values in ``[0, num_classes)``.
        num_classes: number of classes of the task (not of the labels present).
        name: registry name of the dataset (selects normalisation defaults).
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` when unknown; used to
            refuse drawing validation or pruning data from the test set.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    split: str | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"{self.name}: images must be a uint8 tensor (N, C, H, W), "
                f"got {self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"{self.name}: labels must be an int64 tensor (N,), "
                f"got {self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        if self.num_classes < 1:
            raise ValueError(f"{self.name}: num_classes must be positive, got {self.num_classes}")
        if self.labels.numel() and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes
        ):
            raise ValueError(
                f"{self.name}: labels span [{int(self.labels.min())}, {int(self.labels.max())}],"
                f" outside [0, {self.num_classes})"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def class_counts(self) -> torch.Tensor:
        """Number of samples per class, int64 tensor of length ``num_classes``."""
        return torch.bincount(self.labels, minlength=self.num_classes)
