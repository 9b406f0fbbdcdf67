"""Importance scores of NNrelief (pure tensor functions).

Notation follows ``ALGORITHM.md``: for neuron/filter ``j`` and input ``i`` the mean absolute
contribution ``a_ij``, the neuron's total signal ``S_j = sum_i a_ij + bias_term_j`` and the
relative scores ``s_ij = a_ij / S_j``.

Statistics are accumulated as *sums over samples* (plus a sample count elsewhere), so that
shards of a pruning set can simply be added up before the scores are formed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Upper bound on the number of float elements in one temporary of the conv statistics;
# larger batches are processed in chunks so memory does not grow with the batch size.
_CHUNK_ELEMENTS = 1 << 24


def linear_abs_input_sum(x: Tensor) -> tuple[Tensor, int]:
    """Sum over samples of ``|x_ni|`` for a Linear input ``x`` of shape (..., I).

    Every leading index counts as one sample. Returns the (I,) sum and the sample count.
    """
    flat = x.detach().reshape(-1, x.shape[-1])
    return flat.abs().sum(0, dtype=torch.float64).to(torch.float32), flat.shape[0]


def linear_contributions(weight: Tensor, mean_abs_input: Tensor) -> Tensor:
    """``a_ij = |w_ij| * mean_n |x_ni|`` for a (J, I) weight and (I,) mean input."""
    return weight.detach().abs() * mean_abs_input.to(weight.dtype).unsqueeze(0)


def _pad_for_conv(x: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """Pad ``x`` exactly as ``conv`` pads its input (any padding mode, 'same' included)."""
    pad = conv._reversed_padding_repeated_twice
    if not any(pad):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pad, mode=mode)


def conv_patches(x: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """The unfolded patches of every input channel: (B, C, k*k, L) for L output positions."""
    padded = _pad_for_conv(x, conv)
    cols = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    batch, channels = x.shape[0], x.shape[1]
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    return cols.view(batch, channels, taps, cols.shape[-1])


def conv_norm_sum(abs_x: Tensor, abs_weight: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """Sum over samples of ``|| |K_ji| * |x_ni| ||_F`` for every (filter j, input channel i).

    ``abs_x`` is (B, C, H, W) = |layer input|, ``abs_weight`` (J, C, kh, kw) = |kernel|;
    ``*`` is the layer's own convolution (stride, padding, dilation) of one input channel
    map with one kernel slice. The squared norm is the quadratic form
    ``vec|K_ji|^T G_ni vec|K_ji|`` with ``G_ni`` the Gram matrix of the unfolded patches of
    channel i, so no per-(j, i) output map is ever built. Returns a (J, C) float32 tensor.
    """
    batch, channels = abs_x.shape[:2]
    filters = abs_weight.shape[0]
    taps = abs_weight.shape[2] * abs_weight.shape[3]
    w = abs_weight.reshape(filters, channels, taps)
    positions = _output_positions(abs_x, conv)
    per_sample = max(channels * taps * max(positions, filters), 1)
    step = max(1, _CHUNK_ELEMENTS // per_sample)
    total = torch.zeros(filters, channels, dtype=torch.float64, device=abs_x.device)
    for start in range(0, batch, step):
        patches = conv_patches(abs_x[start : start + step], conv)
        gram = patches @ patches.transpose(-1, -2)  # (b, C, k2, k2)
        squared = torch.einsum("jck,bckm,jcm->bjc", w, gram, w)
        total += squared.clamp_min(0).sqrt().sum(0, dtype=torch.float64)
    return total.to(torch.float32)


def conv_mean_map_norms(mean_abs_x: Tensor, abs_weight: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """Authors' variant: ``|| |K_ji| * mean_n |x_ni| ||_F`` from the (C, H, W) mean map."""
    return conv_norm_sum(mean_abs_x.unsqueeze(0), abs_weight, conv)


def _output_positions(x: Tensor, conv: torch.nn.Conv2d) -> int:
    """Number of output positions h1 * h2 of ``conv`` applied to ``x``."""
    pad = conv._reversed_padding_repeated_twice
    sizes = []
    for dim in range(2):
        extent = x.shape[2 + dim] + pad[2 * (1 - dim)] + pad[2 * (1 - dim) + 1]
        reach = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
        sizes.append((extent - reach) // conv.stride[dim] + 1)
    return max(sizes[0], 0) * max(sizes[1], 0)


def conv_output_positions(input_hw: tuple[int, int], conv: torch.nn.Conv2d) -> int:
    """h1 * h2 for an input of spatial size ``input_hw``."""
    return _output_positions(torch.empty(0, 0, *input_hw), conv)


def bias_term(bias: Tensor | None, positions: int = 1) -> Tensor | None:
    """The bias' share of the signal: ``|b_j|`` (FC) or ``|b_j| * sqrt(h1 * h2)`` (conv)."""
    if bias is None:
        return None
    return bias.detach().abs().to(torch.float32) * math.sqrt(positions)


def relative_scores(contrib: Tensor, bias_share: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``s_ij = a_ij / S_j`` and the bias score ``bias_share_j / S_j`` (0 where ``S_j`` = 0)."""
    total = contrib.sum(1)
    if bias_share is not None:
        total = total + bias_share
    safe = torch.where(total > 0, total, torch.ones_like(total))
    scores = torch.where(total.unsqueeze(1) > 0, contrib / safe.unsqueeze(1), torch.zeros_like(contrib))
    if bias_share is None:
        return scores, None
    return scores, torch.where(total > 0, bias_share / safe, torch.zeros_like(bias_share))
