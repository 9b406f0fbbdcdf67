"""On-device batches of next-token windows of a :class:`~.text.TokenStream`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..distributed import shard_bounds
from ._seed import seeded_generator
from .text import TokenStream, windows
from .transforms import to_device_async


class SequenceLoader:
    """Iterate over fixed-length windows of a token stream: ``(x, y)``, int64 (B, context),
    ``y`` being ``x`` shifted by one token (the next-token targets).

    With ``shuffle`` (training) each batch holds ``batch_size`` windows starting at
    uniformly drawn positions, from a generator seeded with ``(seed, epoch)`` only (so a
    resumed run sees the same batches), ``steps`` batches an epoch (default: as many as
    one pass over the stream takes). Without it (evaluation) the windows are consecutive,
    ``[k * context, (k + 1) * context]``: every token but the first is a target exactly
    once; a tail shorter than ``context`` tokens is left out.

    The tokens move to ``device`` once. ``rank``, ``world_size`` and ``even_shards`` split
    every batch over processes as :class:`~.loader.BatchLoader` does.
    """

    def __init__(
        self,
        stream: TokenStream,
        batch_size: int,
        context: int,
        *,
        shuffle: bool,
        seed: int,
        device: str | torch.device = "cpu",
        steps: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = False,
    ) -> None:
        if batch_size < 1 or context < 1:
            raise ValueError(f"batch_size and context must be positive, got {batch_size} and {context}")
        if len(stream) <= context:
            raise ValueError(f"{stream.name} ({stream.split}): {len(stream)} tokens, fewer than one window of "
                             f"context {context} + 1 target; use a shorter context")  # fmt: skip
        if steps is not None and (steps < 1 or not shuffle):
            raise ValueError(f"steps must be a positive number of shuffled batches, got {steps} (shuffle={shuffle})")
        shard_bounds(batch_size, rank, world_size)  # validates rank and world_size
        if even_shards and batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the {world_size} processes")
        self.stream, self.batch_size, self.context = stream, batch_size, context
        self.shuffle, self.seed, self.device = shuffle, seed, torch.device(device)
        self.num_windows = (len(stream) - 1) // context
        self.steps = steps if steps is not None else max(1, self.num_windows // batch_size)
        self.rank, self.world_size, self.even_shards = rank, world_size, even_shards
        self.epoch = 0
        self._tokens = stream.tokens.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose windows the next pass draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps if self.shuffle else -(-self.num_windows // self.batch_size)

    def _starts(self) -> torch.Tensor:
        """The start positions of this epoch's windows, batch after batch (CPU)."""
        if not self.shuffle:
            return torch.arange(self.num_windows) * self.context
        generator = seeded_generator("sequences", self.seed, self.epoch)
        return torch.randint(0, len(self.stream) - self.context, (self.steps * self.batch_size,), generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        starts = to_device_async(self._starts(), self.device)
        for i in range(len(self)):
            batch = starts[i * self.batch_size:(i + 1) * self.batch_size]
            size = len(batch) - (len(batch) % self.world_size if self.even_shards else 0)
            start, stop = shard_bounds(size, self.rank, self.world_size)
            if stop > start:
                yield windows(self._tokens, batch[start:stop], self.context)
