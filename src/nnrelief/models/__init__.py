"""Model zoo: the networks used in the NNrelief paper and MobileNetV2, all ``torch.fx``-traceable,
and a small byte-level Llama decoder (``byte_llama``, from ``transformers``).

All constructors use Kaiming-normal initialisation of conv/linear weights with
``mode="fan_in"``, ``nonlinearity="relu"``, zero biases, BatchNorm weight 1 and bias 0.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .lenet import LeNet5, LeNet300100, lenet5, lenet300_100
from .llama import BYTE_LLAMA_CONTEXT, byte_llama
from .mobilenetv2 import InvertedResidual, MobileNetV2, mobilenetv2_cifar
from .resnet_cifar import (
    BasicBlock,
    PadShortcut,
    ResNetCifar,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    resnet_cifar,
)
from .resnet_tiny import ProjBasicBlock, ResNet18Tiny, resnet18_tiny
from .vgg import VGG, vgg, vgg11, vgg13, vgg16, vgg19, vgg_like

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300_100": lenet300_100,
    "lenet5": lenet5,
    "vgg_like": vgg_like,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet18_tiny": resnet18_tiny,
    "mobilenetv2_cifar": mobilenetv2_cifar,
    "byte_llama": byte_llama,
}

_MNIST_SHAPE = (1, 28, 28)
_CIFAR_SHAPE = (3, 32, 32)
_TINY_SHAPE = (3, 64, 64)

# (C, H, W) of an image classifier; (T,) of a language model: its context of T tokens.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "lenet300_100": _MNIST_SHAPE,
    "lenet5": _MNIST_SHAPE,
    "vgg_like": _CIFAR_SHAPE,
    "vgg11": _CIFAR_SHAPE,
    "vgg13": _CIFAR_SHAPE,
    "vgg16": _CIFAR_SHAPE,
    "vgg19": _CIFAR_SHAPE,
    "resnet20": _CIFAR_SHAPE,
    "resnet32": _CIFAR_SHAPE,
    "resnet44": _CIFAR_SHAPE,
    "resnet56": _CIFAR_SHAPE,
    "resnet110": _CIFAR_SHAPE,
    "resnet18_tiny": _TINY_SHAPE,
    "mobilenetv2_cifar": _CIFAR_SHAPE,
    "byte_llama": (BYTE_LLAMA_CONTEXT,),
}
IMAGE_MODELS = tuple(name for name, shape in INPUT_SHAPES.items() if len(shape) == 3)
"""The image classifiers of :data:`MODELS` (the others are language models)."""


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")


def get_model(name: str, num_classes: int) -> nn.Module:
    """Build the registered model ``name`` with ``num_classes`` outputs.

    Raises ValueError listing the valid names if ``name`` is not registered.
    """
    _check_name(name)
    return MODELS[name](num_classes=num_classes)


def input_shape(name: str) -> tuple[int, ...]:
    """(C, H, W) input shape expected by the registered model ``name``; (T,) for a
    language model (token sequences of up to T tokens)."""
    _check_name(name)
    return INPUT_SHAPES[name]


__all__ = [
    "BYTE_LLAMA_CONTEXT",
    "BasicBlock",
    "IMAGE_MODELS",
    "INPUT_SHAPES",
    "InvertedResidual",
    "LeNet300100",
    "LeNet5",
    "MODELS",
    "MobileNetV2",
    "PadShortcut",
    "ProjBasicBlock",
    "ResNet18Tiny",
    "ResNetCifar",
    "VGG",
    "byte_llama",
    "get_model",
    "input_shape",
    "lenet300_100",
    "lenet5",
    "mobilenetv2_cifar",
    "resnet110",
    "resnet18_tiny",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet_cifar",
    "vgg",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "vgg_like",
]
