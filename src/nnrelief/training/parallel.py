"""Every torch.distributed call of training (``torchrun``; see :mod:`nnrelief.distributed`
for the process group): the model trains through ``DistributedDataParallel``, the sums of
a pass are added over the processes, BatchNorm statistics are rank 0's after each epoch,
and rank 0 alone reads the checkpoint. With one process nothing is sent anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import from_main, is_distributed
from .checkpoint import read_checkpoint_if_any
from .config import TrainConfig


def all_reduce_sums(*values: Tensor) -> tuple[Tensor, ...]:
    """The sums of ``values`` over all ranks (new tensors; the inputs when not distributed)."""
    if not is_distributed():
        return values
    summed = tuple(value.clone() for value in values)
    for value in summed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return summed


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, masks)."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def wrap_model(model: nn.Module) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when distributed, else ``model`` itself.

    The wrapper shares the model's parameters: optimise ``model.parameters()`` and
    train through the returned module, whose backward averages the gradients of all
    ranks. Rank 0's parameters and buffers are copied to all ranks here; buffers are not
    broadcast at every step (pruning masks are as large as the weights and equal on all
    ranks anyway): call :func:`broadcast_buffers` to align BatchNorm statistics.
    """
    if not is_distributed():
        return model
    parameter = next(model.parameters(), None)
    ids = [parameter.device.index] if parameter is not None and parameter.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def checkpoint_on_every_rank(path: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (checked against ``cfg``) or ``None``: rank 0 reads it and
    every rank gets it, so the run folder need not be on a shared filesystem."""
    return from_main(read_checkpoint_if_any, path, cfg)
