"""CIFAR-style VGG networks (3x32x32 inputs): VGG-11/13/16/19 and the VGG-like net."""

from __future__ import annotations

import torch
from torch import nn

from ._init import init_weights_

# Standard VGG configurations A/B/D/E; "M" is a 2x2 max-pool.
CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
         512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_features(config: list[int | str], batch_norm: bool = True) -> nn.Sequential:
    """Conv3x3(pad 1, with bias) [-> BatchNorm2d] -> ReLU per int entry, MaxPool2d(2) per "M"."""
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in config:
        if entry == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out_channels = int(entry)
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        in_channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``features`` (ending in a 512x1x1 map for 32x32 inputs), flatten, ``classifier``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg_like(num_classes: int = 10) -> VGG:
    """VGG-like net of the NNrelief paper: VGG-16 convs with BN, FC 512-512-``num_classes``.

    Classifier: Dropout(0.5) -> Linear(512, 512) -> ReLU -> Dropout(0.5) -> Linear(512, 512)
    -> ReLU -> Linear(512, num_classes). Kaiming-normal fan_in init.
    """
    classifier = nn.Sequential(
        nn.Dropout(0.5),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )
    return init_weights_(VGG(make_features(CONFIGS[16], batch_norm=True), classifier))


def vgg(depth: int, num_classes: int = 10, batch_norm: bool = True) -> VGG:
    """CIFAR VGG-``depth`` (11, 13, 16 or 19; configs A/B/D/E) for 32x32 inputs.

    Convs are 3x3, pad 1, with bias, optionally followed by BatchNorm2d, then ReLU. The
    classifier is a single Linear(512, num_classes) (the usual CIFAR VGG head; use
    :func:`vgg_like` for the 512-512 FC head with dropout). Kaiming-normal fan_in init.
    """
    if depth not in CONFIGS:
        raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
    classifier = nn.Sequential(nn.Linear(512, num_classes))
    return init_weights_(VGG(make_features(CONFIGS[depth], batch_norm), classifier))


def vgg11(num_classes: int = 10) -> VGG:
    """VGG-11 with BatchNorm, see :func:`vgg`."""
    return vgg(11, num_classes)


def vgg13(num_classes: int = 10) -> VGG:
    """VGG-13 with BatchNorm, see :func:`vgg`."""
    return vgg(13, num_classes)


def vgg16(num_classes: int = 10) -> VGG:
    """VGG-16 with BatchNorm, see :func:`vgg`."""
    return vgg(16, num_classes)


def vgg19(num_classes: int = 10) -> VGG:
    """VGG-19 with BatchNorm, see :func:`vgg`."""
    return vgg(19, num_classes)
