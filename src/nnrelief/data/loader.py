"""On-device, whole-batch data loading with reproducible shuffling and augmentation."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from ..distributed import shard_bounds
from ._seed import seeded_generator
from .dataset import TensorDataset
from .registry import DATASETS
from .transforms import Normalize, random_crop_flip, to_device_async

logger = logging.getLogger(__name__)


def default_normalize(name: str) -> Normalize:
    """The registry's normalisation for dataset ``name``; pixels / 255 if unknown."""
    if name in DATASETS:
        return DATASETS[name].normalize
    logger.warning("dataset %r is not registered: normalising with pixels / 255 only", name)
    return Normalize()


class BatchLoader:
    """Iterate over a :class:`TensorDataset` in batches, entirely with tensor ops.

    The uint8 images are moved to ``device`` once; each batch is gathered, optionally
    augmented (random crop with 4-pixel zero padding + horizontal flip) and normalised
    there. Shuffle order and augmentation draw from a generator seeded with a hash of
    ``(seed, epoch)`` only, so iterating the same epoch again (e.g. after resuming a run)
    yields the same batches.

    Args:
        dataset: the data.
        batch_size: samples per batch.
        shuffle: draw a new sample order each epoch.
        seed: base seed of shuffling and augmentation.
        device: where the data and batches live.
        augment: apply crop + flip augmentation (the registry's ``augment`` field holds
            each dataset's training default).
        normalize: pixel normalisation; ``None`` uses the registry's default for
            ``dataset.name``.
        drop_last: skip the last, incomplete batch.
        rank: this process's rank (see below).
        world_size: number of processes sharing the batches (``torchrun``).
        even_shards: with ``world_size > 1``, cut the last batch to a multiple of
            ``world_size`` (at most ``world_size - 1`` samples of an epoch are left out,
            other ones each epoch when shuffling), so that every rank gets the same number
            of samples in every batch; ``batch_size`` must then be a multiple of
            ``world_size``. Needed for training with DistributedDataParallel, whose
            averaged gradients then equal those of one process on the whole batch.

    With ``world_size > 1`` the batches are those of one process (the same order), and
    each is split into ``world_size`` contiguous parts, rank ``r`` yielding part ``r``:
    ``batch_size`` is the global batch, ``batch_size / world_size`` the batch per rank.
    Every rank yields ``len(self)`` batches; without ``even_shards`` a part may be one
    sample shorter than the others or, in the last batch, empty (then skipped).

    Yields:
        ``(x, y)``: float32 images (B, C, H, W) and int64 labels (B,) on ``device``.
    """

    def __init__(
        self,
        dataset: TensorDataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        device: str | torch.device = "cpu",
        augment: bool = False,
        normalize: Normalize | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        shard_bounds(batch_size, rank, world_size)  # validates rank and world_size
        if even_shards and batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} must be a multiple of the {world_size} processes "
                "(the batch is split evenly over them)"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = torch.device(device)
        self.augment = augment
        self.normalize = normalize if normalize is not None else default_normalize(dataset.name)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.even_shards = even_shards
        self.epoch = 0
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle order and augmentation the next pass uses."""
        self.epoch = epoch

    @property
    def same_size(self) -> bool:
        """Whether every batch this process yields has the same number of samples."""
        return self.drop_last or len(self.dataset) % self.batch_size == 0 or len(self) == 1

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        if self.even_shards:
            rest -= rest % self.world_size
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = seeded_generator("batches", self.seed, self.epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = to_device_async(order, self.device)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            start, stop = self._shard(len(index))
            if self.augment:  # drawn for the whole batch: each sample as in one process
                x = random_crop_flip(self._images[index], generator)[start:stop]
            else:
                x = self._images[index[start:stop]]
            if stop > start:
                yield self.normalize(x), self._labels[index[start:stop]]

    def _shard(self, size: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's part of a batch of ``size`` samples."""
        if self.even_shards:
            size -= size % self.world_size
        return shard_bounds(size, self.rank, self.world_size)
