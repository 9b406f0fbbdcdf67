"""He et al. CIFAR ResNets (depth 6n+2) with option-A zero-padding shortcuts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._init import init_weights_

DEPTHS: tuple[int, ...] = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 spatially, zero-pad ``pad`` channels on each side.

    The input's channels land in ``[pad, pad + C_in)`` of the output; every other
    channel is zero. For a block going from ``planes // 2`` to ``planes`` channels,
    ``pad = planes // 4``.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus ``shortcut`` (Identity or PadShortcut), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = self.make_shortcut(in_planes, planes, stride)

    @staticmethod
    def make_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
        """The option-A shortcut: Identity, or PadShortcut where the width doubles at stride 2."""
        if stride == 1 and in_planes == planes:
            return nn.Identity()
        if stride == 2 and planes == 2 * in_planes:
            return PadShortcut(planes // 4)
        raise ValueError(
            "option-A shortcut needs stride 1 with equal widths or stride 2 with "
            f"doubled width; got in_planes={in_planes}, planes={planes}, stride={stride}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class ResNetCifar(nn.Module):
    """Stem conv3x3(3, 16)-BN-ReLU, stages of ``n`` blocks (16/32/64), avg pool, FC."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(16, 16, n, stride=1)
        self.layer2 = self._make_stage(16, 32, n, stride=2)
        self.layer3 = self._make_stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_cifar(depth: int, num_classes: int = 10) -> ResNetCifar:
    """CIFAR ResNet-``depth`` (20, 32, 44, 56 or 110), option-A shortcuts.

    Kaiming-normal fan_in init of conv/FC weights, zero FC bias, BN weight 1 bias 0.
    """
    if depth not in DEPTHS:
        raise ValueError(f"CIFAR ResNet depth must be one of {list(DEPTHS)}, got {depth}")
    return init_weights_(ResNetCifar((depth - 2) // 6, num_classes))


def resnet20(num_classes: int = 10) -> ResNetCifar:
    """ResNet-20 (269,722 trainable parameters for 10 classes), see :func:`resnet_cifar`."""
    return resnet_cifar(20, num_classes)


def resnet32(num_classes: int = 10) -> ResNetCifar:
    """ResNet-32, see :func:`resnet_cifar`."""
    return resnet_cifar(32, num_classes)


def resnet44(num_classes: int = 10) -> ResNetCifar:
    """ResNet-44, see :func:`resnet_cifar`."""
    return resnet_cifar(44, num_classes)


def resnet56(num_classes: int = 10) -> ResNetCifar:
    """ResNet-56, see :func:`resnet_cifar`."""
    return resnet_cifar(56, num_classes)


def resnet110(num_classes: int = 10) -> ResNetCifar:
    """ResNet-110, see :func:`resnet_cifar`."""
    return resnet_cifar(110, num_classes)
