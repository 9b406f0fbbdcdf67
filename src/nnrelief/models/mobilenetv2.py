"""MobileNetV2 (Sandler et al., 2018) for 32x32 inputs (CIFAR).

The ImageNet network with the usual CIFAR changes: the stem conv and the second stage
have stride 1 instead of 2, so a 32x32 input reaches 4x4 before the global pooling.
Inverted residual blocks: 1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 ->
1x1 project -> BN, plus the identity when the stride is 1 and the widths match.
"""

from __future__ import annotations

import torch
from torch import nn

from ._init import init_weights_

# (expansion t, output channels c, blocks n, stride of the first block s); CIFAR strides.
CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    return layers + [nn.ReLU6()] if act else layers


class InvertedResidual(nn.Module):
    """Expand (skipped when t = 1), depthwise, linear projection; identity added when it fits."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers = _conv_bn(in_channels, hidden, 1) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, out_channels, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with width multiplier ``width`` (channels rounded to multiples of 8)."""

    def __init__(
        self,
        num_classes: int = 10,
        width: float = 1.0,
        settings: tuple[tuple[int, int, int, int], ...] = CIFAR_SETTINGS,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()

        def scaled(channels: int) -> int:
            return max(8, int(channels * width + 4) // 8 * 8)

        in_channels = scaled(32)
        layers: list[nn.Module] = _conv_bn(3, in_channels, 3, stride=1)
        for expansion, channels, blocks, stride in settings:
            for index in range(blocks):
                layers.append(InvertedResidual(in_channels, scaled(channels), stride if index == 0 else 1, expansion))
                in_channels = scaled(channels)
        last = max(1280, scaled(1280))
        layers += _conv_bn(in_channels, last, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        init_weights_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def mobilenetv2_cifar(num_classes: int = 10, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for 32x32 inputs (2.2 M parameters at width 1 and 10 classes)."""
    return MobileNetV2(num_classes=num_classes, width=width)
