"""The layer kinds NNrelief prunes, one entry each (as Torch-Pruning's per-type pruners keyed
by module type): the weight layout (which axis is "out", which "in", stored transposed or
not), the conv geometry, what the statistics observe and which score formula applies (the
``family``), and how compaction slices the layer. Every other module asks :func:`kind_of`.

A new kind is one subclass of :class:`LayerKind` (or an instance of an existing one for
other module types) added to :data:`KINDS`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from .geometry import ConvGeometry, regroup, spread_input


class LayerKind:
    """How NNrelief handles one type of layer.

    Attributes:
        name: the kind in messages ("Linear", "Conv1d/2d/3d", ...).
        family: ``"linear"`` (scored on its mean |input|, alpha ``alpha_fc``) or ``"conv"``
            (scored on its input patches through :meth:`geometry`, alpha ``alpha_conv``).
        types: the module types of the kind.
        ops: the ATen ops of its forward in a capture -> (argument of the data input, of the weight).
        transposed: its weight is stored (in, out, ...) rather than (out, in, ...).
    """

    name: str
    family: str
    types: tuple[type, ...]
    ops: Mapping[str, tuple[int, int]]
    transposed: bool = False

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind."""
        return isinstance(module, self.types) and not isinstance(module, nn.modules.lazy.LazyModuleMixin)

    def kernel(self, module: nn.Module, tensor: Tensor) -> Tensor:
        """``tensor`` (laid out like ``module.weight``) as (out, in / groups, *kernel)."""
        return tensor

    def stored(self, module: nn.Module, tensor: Tensor) -> Tensor:
        """The inverse of :meth:`kernel`: back to ``module.weight``'s own layout."""
        return tensor

    def depthwise(self, module: nn.Module) -> bool:
        """Output channel c reads input channel c alone (so both are sliced alike)."""
        return False

    def slice(self, module: nn.Module, rows: Tensor | None, cols: Tensor | None) -> None:
        """Keep only output channels ``rows`` and input channels ``cols`` (index tensors;
        None keeps all) of ``module``, in place."""
        raise NotImplementedError

    def example_input(self, module: nn.Module) -> Tensor | None:
        """A batch of one input for a model starting with ``module``, where its shape is known."""
        return None

    def uses_channels_last(self, module: nn.Module) -> bool:
        """Whether training on CUDA should store the model channels-last for this layer."""
        return False


def _parameter(tensor: Tensor, like: Tensor) -> nn.Parameter:
    """``tensor`` (new, sliced out of ``like``) as a parameter taking ``like``'s ``requires_grad``."""
    return nn.Parameter(tensor, requires_grad=like.requires_grad)


def _slice_weight(module: nn.Module, rows: Tensor | None, cols: Tensor | None, out_axis: int) -> Tensor:
    """``module``'s weight and bias with only ``rows`` on ``out_axis`` and ``cols`` on the other
    of the first two axes, gathered once into a new tensor (with neither, the weight keeps
    its tensor); returns the weight."""
    weight = module.weight.detach()
    if rows is None and cols is None:
        return weight
    first, second = (None if index is None else index.to(weight.device) for index in ((rows, cols) if out_axis == 0 else (cols, rows)))
    if first is not None and second is not None:
        weight = weight[first[:, None], second]
    else:
        weight = weight.index_select(0, first) if first is not None else weight.index_select(1, second)
    module.weight = _parameter(weight, module.weight)
    if module.bias is not None and rows is not None:
        module.bias = _parameter(module.bias.detach()[rows.to(weight.device)], module.bias)
    return weight


_LINEAR_OPS = {"linear": (0, 1), "addmm": (1, 2)}  # addmm(bias, x, weight): GPT-2's Conv1D


class LinearKind(LayerKind):
    """``nn.Linear``: weight (out, in)."""

    name, family, types, ops = "Linear", "linear", (nn.Linear,), _LINEAR_OPS

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def slice(self, module: nn.Module, rows: Tensor | None, cols: Tensor | None) -> None:
        weight = _slice_weight(module, rows, cols, 0)
        module.out_features, module.in_features = weight.shape

    def example_input(self, module: nn.Module) -> Tensor | None:
        return torch.zeros(1, module.in_features, dtype=module.weight.dtype, device=module.weight.device)


class TransposedLinearKind(LayerKind):
    """Hugging Face ``Conv1D`` (GPT-2): a Linear layer whose weight is stored (in, out)."""

    name, family, types, ops, transposed = "Conv1D (Hugging Face)", "linear", (), _LINEAR_OPS, True

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (
            type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, Tensor)
            and weight.dim() == 2 and weight.shape[1] == module.nf
        )  # fmt: skip

    def kernel(self, module: nn.Module, tensor: Tensor) -> Tensor:
        return tensor.t()

    def stored(self, module: nn.Module, tensor: Tensor) -> Tensor:
        return tensor.t()

    def slice(self, module: nn.Module, rows: Tensor | None, cols: Tensor | None) -> None:
        weight = _slice_weight(module, rows, cols, 1)
        module.nf = weight.shape[1]
        if hasattr(module, "nx"):
            module.nx = weight.shape[0]


class ConvKind(LayerKind):
    """``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: weight (out, in / groups, *kernel)."""

    name, family = "Conv1d/2d/3d", "conv"
    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    ops = {"conv1d": (0, 1), "conv2d": (0, 1), "conv3d": (0, 1)}

    def geometry(self, module: nn.Module) -> ConvGeometry:
        """The direct convolution the layer computes."""
        return ConvGeometry(
            tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation),
            tuple(module._reversed_padding_repeated_twice), module.padding_mode, module.groups,
        )  # fmt: skip

    def direct_input(self, module: nn.Module, x: Tensor) -> Tensor:
        """The layer's input as the input of :meth:`geometry`'s conv."""
        return x

    def direct_kernel(self, module: nn.Module, weight: Tensor | None = None) -> Tensor:
        """The layer's weight (or ``weight``, laid out like it) as the kernel of :meth:`geometry`'s conv."""
        return module.weight if weight is None else weight

    def depthwise(self, module: nn.Module) -> bool:
        return module.groups > 1 and module.in_channels == module.groups and module.out_channels == module.groups

    def slice(self, module: nn.Module, rows: Tensor | None, cols: Tensor | None) -> None:
        depthwise = self.depthwise(module)
        weight = _slice_weight(module, rows, cols if module.groups == 1 else None, 0)
        module.out_channels = weight.shape[0]
        module.in_channels = weight.shape[0] if depthwise else weight.shape[1] * module.groups
        if depthwise:
            module.groups = weight.shape[0]

    def uses_channels_last(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)


class ConvTransposeKind(ConvKind):
    """``nn.ConvTranspose1d/2d/3d``: weight (in, out / groups, *kernel); scored as the direct
    conv of its spread input (:func:`~nnrelief.kinds.geometry.spread_input`) with its kernels flipped."""

    name, transposed = "ConvTranspose1d/2d/3d", True
    types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    ops = {"conv_transpose1d": (0, 1), "conv_transpose2d": (0, 1), "conv_transpose3d": (0, 1)}

    def kernel(self, module: nn.Module, tensor: Tensor) -> Tensor:
        return regroup(tensor, module.groups)

    def stored(self, module: nn.Module, tensor: Tensor) -> Tensor:
        return regroup(tensor, module.groups)

    def geometry(self, module: nn.Module) -> ConvGeometry:
        return ConvGeometry(tuple(module.kernel_size), dilation=tuple(module.dilation), groups=module.groups)

    def direct_input(self, module: nn.Module, x: Tensor) -> Tensor:
        return spread_input(x, module.stride, module.dilation, module.kernel_size, module.padding, module.output_padding)

    def direct_kernel(self, module: nn.Module, weight: Tensor | None = None) -> Tensor:
        kernel = self.kernel(module, module.weight if weight is None else weight)
        return kernel.flip(list(range(2, kernel.dim())))

    def depthwise(self, module: nn.Module) -> bool:
        return False  # grouped: kept whole

    def slice(self, module: nn.Module, rows: Tensor | None, cols: Tensor | None) -> None:
        if module.groups > 1:
            return  # grouped: compaction keeps every channel of its groups (its rows index out / groups per group)
        weight = _slice_weight(module, rows, cols, 1)
        module.in_channels, module.out_channels = weight.shape[0], weight.shape[1] * module.groups

    def uses_channels_last(self, module: nn.Module) -> bool:
        return False


KINDS: tuple[LayerKind, ...] = (LinearKind(), TransposedLinearKind(), ConvKind(), ConvTransposeKind())
"""Every layer kind NNrelief scores; the first that matches a module is its kind."""


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of ``module``, or None if NNrelief does not score it."""
    return next((kind for kind in KINDS if kind.matches(module)), None)


def scored_kinds() -> str:
    """The kinds by name, for messages: 'Linear, ..., ConvTranspose1d/2d/3d'."""
    return ", ".join(kind.name for kind in KINDS)


def unscored_reason(module: nn.Module) -> str | None:
    """Why a weighted layer NNrelief knows of but does not score is left whole, else None."""
    if isinstance(module, nn.Bilinear):
        return f"{type(module).__name__} is not scored (only {scored_kinds()} are)"
    if isinstance(module, nn.RNNBase):
        return f"{type(module).__name__} weights are not scored (recurrent layers are left whole)"
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        return "in_proj_weight (packed query/key/value projection) is not scored; out_proj is"
    return None


def layer_ops() -> dict[str, tuple[int, int, str]]:
    """ATen op of a layer call -> (argument of its data input, of its weight, its family), over every kind."""
    return {op: (*arguments, kind.family) for kind in KINDS for op, arguments in kind.ops.items()}
