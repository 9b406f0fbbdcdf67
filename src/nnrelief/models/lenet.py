"""LeNet-300-100 and LeNet-5 (Caffe variant) for 1x28x28 MNIST inputs."""

from __future__ import annotations

import torch
from torch import nn

from ._init import init_weights_


class LeNet300100(nn.Module):
    """Fully connected 784-300-100-``num_classes`` network with ReLU activations."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe LeNet-5: conv20(5x5)-pool-conv50(5x5)-pool-fc500-fc``num_classes``.

    A ReLU follows each convolution (before its max-pool) and the first FC layer.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        return self.fc2(x)


def lenet300_100(num_classes: int = 10) -> LeNet300100:
    """LeNet-300-100 (266,610 parameters for 10 classes), Kaiming-normal fan_in init."""
    return init_weights_(LeNet300100(num_classes))


def lenet5(num_classes: int = 10) -> LeNet5:
    """Caffe LeNet-5 (431,080 parameters for 10 classes), Kaiming-normal fan_in init."""
    return init_weights_(LeNet5(num_classes))
