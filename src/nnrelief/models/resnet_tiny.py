"""ResNet-18 adapted to 3x64x64 Tiny-ImageNet inputs."""

from __future__ import annotations

import torch
from torch import nn

from ._init import init_weights_
from .resnet_cifar import BasicBlock


class ProjBasicBlock(BasicBlock):
    """:class:`~nnrelief.models.resnet_cifar.BasicBlock` with a projection shortcut:
    ``nn.Identity()`` when the shape is unchanged, otherwise
    ``nn.Sequential(Conv2d 1x1 (stride, no bias), BatchNorm2d)``."""

    @staticmethod
    def make_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
        """Identity, or the 1x1 projection (with BatchNorm) where the shape changes."""
        if stride == 1 and in_planes == planes:
            return nn.Identity()
        return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))


class ResNet18Tiny(nn.Module):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2], widths 64-128-256-512) for 64x64 inputs.

    The ImageNet stem (7x7 stride-2 conv + 3x3 max-pool) is replaced by a 3x3 stride-1
    conv without max-pool, as is common for 64x64 Tiny-ImageNet: the last stage then
    works on an 8x8 map instead of 2x2.
    """

    def __init__(self, num_classes: int = 200) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(64, 64, stride=1)
        self.layer2 = self._make_stage(64, 128, stride=2)
        self.layer3 = self._make_stage(128, 256, stride=2)
        self.layer4 = self._make_stage(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            ProjBasicBlock(in_planes, planes, stride), ProjBasicBlock(planes, planes, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18_tiny(num_classes: int = 200) -> ResNet18Tiny:
    """ResNet-18 for Tiny-ImageNet (3x3 stride-1 stem, no max-pool, projection shortcuts).

    Kaiming-normal fan_in init of conv/FC weights, zero FC bias, BN weight 1 bias 0.
    """
    return init_weights_(ResNet18Tiny(num_classes))
