"""BatchNorm set-up shared by the compaction tests of the zoo and of the any-model matrix."""

from __future__ import annotations

import torch
from torch import nn


def calibrate_and_dim(model: nn.Module, x: torch.Tensor, *, zero_shift: bool = False) -> None:
    """Set BN running statistics from ``x`` (keeps deep untrained nets' outputs in float32
    range), then scale the BN weights of a quarter of the channels to ~0 so that pruning
    kills them (``zero_shift``: their BN shifts to 0 as well)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
        for norm in norms:
            norm.weight[: norm.num_features // 4] *= 1e-6
            if zero_shift:
                norm.bias[: norm.num_features // 4] = 0.0
    model.eval()
