"""A convolution as NNrelief's conv scores see it: the direct (not transposed) convolution of
1, 2 or 3 spatial dims that computes the layer, and the weight layout helpers behind it."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ConvGeometry:
    """A direct convolution's geometry over ``len(kernel_size)`` spatial dims: what the conv
    scores need of a conv layer. A ConvTranspose is, on its input with ``stride - 1`` zeros
    inserted between neighbours and padded by ``dilation * (k - 1) - padding``
    (``output_padding`` more at the end, :func:`spread_input`), the stride-1 direct conv with
    its kernels flipped and laid out (out, in / groups) (:func:`regroup`)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...] = ()  # () = 1 along every dim
    dilation: tuple[int, ...] = ()  # () = 1 along every dim
    padding: tuple[int, ...] = ()  # F.pad order (last dim first: left, right, top, bottom, ...); () = none
    padding_mode: str = "zeros"
    groups: int = 1

    def __post_init__(self) -> None:
        ones = (1,) * len(self.kernel_size)
        object.__setattr__(self, "stride", tuple(self.stride) or ones)
        object.__setattr__(self, "dilation", tuple(self.dilation) or ones)
        object.__setattr__(self, "padding", tuple(self.padding) or (0, 0) * len(self.kernel_size))

    @property
    def dims(self) -> int:
        """The number of spatial dims."""
        return len(self.kernel_size)


def regroup(tensor: Tensor, groups: int) -> Tensor:
    """A grouped weight (A, B, *kernel) with A split in ``groups`` regrouped as
    (groups * B, A / groups, *kernel): a ConvTranspose's (in, out / g) as (out, in / g), and back."""
    first, per_group = tensor.shape[:2]
    laid = tensor.reshape(groups, first // groups, per_group, *tensor.shape[2:]).transpose(1, 2)
    return laid.reshape(groups * per_group, first // groups, *tensor.shape[2:])


def spread_input(x: Tensor, stride: tuple[int, ...], dilation: tuple[int, ...], kernel_size: tuple[int, ...],
                 padding: tuple[int, ...], output_padding: tuple[int, ...]) -> Tensor:  # fmt: skip
    """A ConvTranspose's (B, C, *spatial) input as the input of its stride-1 direct conv: ``stride - 1``
    zeros between neighbours, padded by ``dilation * (k - 1) - padding`` (``output_padding`` more at the end)."""
    spatial = x.shape[2:]
    spread = x.new_zeros(*x.shape[:2], *((size - 1) * step + 1 for size, step in zip(spatial, stride)))
    spread[(slice(None), slice(None), *(slice(None, None, step) for step in stride))] = x
    pads = [dil * (k - 1) - pad for dil, k, pad in zip(dilation, kernel_size, padding)]
    return F.pad(spread, [side for dim in reversed(range(len(spatial))) for side in (pads[dim], pads[dim] + output_padding[dim])])
