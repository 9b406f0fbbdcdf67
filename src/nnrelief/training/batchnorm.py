"""BatchNorm statistics recomputed for the weights a model has now (after one-shot pruning).

Pruning changes every activation downstream, so the running means and variances the dense
training left no longer match; recomputing them on a few batches (no gradient, no weight
change) is the usual repair before evaluating a pruned CNN without retraining.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..inputs import batch_input

__all__ = ["recompute_batchnorm"]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[Any]) -> int:
    """Replace the running statistics of every BatchNorm layer of ``model`` by the average,
    batch by batch, of the mean and (unbiased) variance over ``batches`` (``momentum=None``,
    as ``torch.optim.swa_utils.update_bn`` does, but with the other layers in eval mode:
    no dropout) and restore modes and momenta. Batches are what :func:`nnrelief.prune`
    takes (dicts of keyword inputs included). Returns the number of BatchNorm layers recomputed."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    device = next(model.parameters()).device
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        for index, batch in enumerate(batches):
            batch_input(batch, index).to(device)(model)
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    return len(norms)
