"""Weight initialisation shared by the model zoo."""

from __future__ import annotations

from torch import nn


def init_weights_(model: nn.Module) -> nn.Module:
    """Initialise ``model`` in place and return it.

    Conv2d / Linear weights: Kaiming-normal, ``mode="fan_in"``, ``nonlinearity="relu"``
    (std = sqrt(2 / fan_in)); their biases: zero. BatchNorm weight 1, bias 0.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model
