"""Importance scores of NNrelief (pure tensor functions).

Notation follows ``ALGORITHM.md``: for neuron/filter ``j`` and input ``i`` the mean absolute
contribution ``a_ij``, the neuron's total signal ``S_j = sum_i a_ij + bias_term_j`` and the
relative scores ``s_ij = a_ij / S_j``.

Statistics are accumulated as *sums over samples* (plus a sample count elsewhere), so that
shards of a pruning set can simply be added up before the scores are formed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kinds import ConvGeometry, kind_of

# On the CPU, batches are processed in chunks whose unfolded patches stay around this many
# floats (a couple of MB: cache-friendly, and memory does not grow with the batch size).
_PATCH_ELEMENTS = 1 << 19
_PRODUCT_ELEMENTS = 1 << 22
# On a GPU, few large chunks keep it busy: each of the two chunk buffers may take this
# fraction of the free memory, at most _GPU_CHUNK_BYTES.
_GPU_FREE_FRACTION = 8
_GPU_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class ChunkBudget:
    """Largest chunk buffers of :func:`conv_norm_sum`, in tensor elements: the unfolded
    patches (chunk x C x k^2 x positions) and the per-sample norms (C x chunk x J/groups)."""

    patch_elements: int = _PATCH_ELEMENTS
    product_elements: int = _PRODUCT_ELEMENTS


def chunk_budget(device: torch.device, element_size: int = 4) -> ChunkBudget:
    """The chunk budget for ``device``: the cache-sized CPU constants, or on CUDA a share of
    the currently free memory (queried once; call it once per pass, not per batch)."""
    if device.type != "cuda":
        return ChunkBudget()
    free, _total = torch.cuda.mem_get_info(device)
    elements = max(min(free // _GPU_FREE_FRACTION, _GPU_CHUNK_BYTES) // element_size, _PATCH_ELEMENTS)
    return ChunkBudget(int(elements), int(elements))


def linear_abs_input_sum(x: Tensor) -> tuple[Tensor, int]:
    """Sum over samples of ``|x_ni|`` for a Linear input ``x`` of shape (..., I).

    Every leading index counts as one sample. Returns the (I,) sum and the sample count.
    """
    flat = x.detach().reshape(-1, x.shape[-1])
    return flat.abs().sum(0).double(), flat.shape[0]


def linear_contributions(weight: Tensor, mean_abs_input: Tensor) -> Tensor:
    """``a_ij = |w_ij| * mean_n |x_ni|`` for a (J, I) weight and (I,) mean input."""
    return weight.detach().abs() * mean_abs_input.to(weight.dtype).unsqueeze(0)


def as_geometry(conv: torch.nn.Module | ConvGeometry) -> ConvGeometry:
    """The :class:`ConvGeometry` of a conv layer of any kind (:mod:`nnrelief.kinds`), or the one given."""
    return conv if isinstance(conv, ConvGeometry) else kind_of(conv).geometry(conv)


def _pad_for_conv(x: Tensor, conv: ConvGeometry) -> Tensor:
    """Pad ``x`` exactly as the conv pads its input (any padding mode, 'same' included)."""
    pad = conv.padding
    if not any(pad):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pad, mode=mode)


def conv_patches(x: Tensor, conv: torch.nn.Module | ConvGeometry) -> Tensor:
    """The shifted copies of every input channel: (B, C, taps, L) for a (B, C, *spatial)
    input, ``taps`` kernel entries and L output positions (1, 2 or 3 spatial dims)."""
    conv = as_geometry(conv)
    padded = _pad_for_conv(x, conv).contiguous()
    batch, channels, *spatial = padded.shape
    strides = padded.stride()
    counts = [(size - dil * (k - 1) - 1) // step + 1
              for size, k, dil, step in zip(spatial, conv.kernel_size, conv.dilation, conv.stride)]  # fmt: skip
    taps_strides = [dil * s for dil, s in zip(conv.dilation, strides[2:])]
    position_strides = [step * s for step, s in zip(conv.stride, strides[2:])]
    view = padded.as_strided((batch, channels, *conv.kernel_size, *counts), (*strides[:2], *taps_strides, *position_strides))
    return view.reshape(batch, channels, math.prod(conv.kernel_size), math.prod(counts))


def kernel_products(abs_weight: Tensor, groups: int = 1) -> Tensor:
    """For a (J, C/g, *kernel) |kernel| of a conv with ``groups`` = g, the products
    ``|K|_t |K|_t'`` of every pair of taps t <= t' (off-diagonal pairs doubled), laid out
    (C, T, J/g) with T = k2 (k2 + 1) / 2 for k2 taps: input channel c pairs with the J/g
    filters of its group (c // (C/g)).

    Depends on the weights only: compute it once per pass and reuse it for every batch.
    """
    filters, group_channels = abs_weight.shape[:2]
    taps = math.prod(abs_weight.shape[2:])
    w = abs_weight.reshape(groups, filters // groups, group_channels, taps)
    w = w.permute(0, 2, 3, 1).reshape(groups * group_channels, taps, filters // groups)  # (C, k2, J/g)
    iu, ju = torch.triu_indices(taps, taps, device=w.device)
    factor = torch.where(iu == ju, 1.0, 2.0).to(w.dtype).view(1, -1, 1)
    return torch.index_select(w, 1, iu).mul_(torch.index_select(w, 1, ju)).mul_(factor)


def conv_norm_sum(
    abs_x: Tensor,
    abs_weight: Tensor,
    conv: torch.nn.Module | ConvGeometry,
    products: Tensor | None = None,
    budget: ChunkBudget | None = None,
) -> Tensor:
    """Sum over samples of ``|| |K_ji| * |x_ni| ||_F`` for every (filter j, input channel i
    of j's group).

    ``abs_x`` is (B, C, *spatial) = |layer input|, ``abs_weight`` (J, C/g, *kernel) = |kernel|
    (g = ``conv.groups``; filter j reads the C/g input channels of its group);
    ``*`` is the layer's own convolution (stride, padding, dilation) of one input channel
    map with one kernel slice. The squared norm is the quadratic form
    ``vec|K_ji|^T G_ni vec|K_ji|`` with ``G_ni`` the k^2 x k^2 Gram matrix of the shifted
    copies of channel i; it is evaluated as one batched matrix product over channels of the
    Gram matrices' upper triangles with the kernel products (``kernel_products``, pass it
    in to reuse it across batches), so no per-(j, i) output map is ever built. The batch
    is processed in chunks within ``budget`` (default: the CPU budget).
    Returns a (J, C/g) float64 tensor, laid out like the kernel's first two dims.
    """
    conv = as_geometry(conv)
    batch, channels = abs_x.shape[:2]
    groups = conv.groups
    filters, group_channels = abs_weight.shape[:2]
    taps = math.prod(abs_weight.shape[2:])
    if products is None:
        products = kernel_products(abs_weight.to(abs_x.dtype), groups)
    iu, ju = torch.triu_indices(taps, taps, device=abs_x.device)
    positions = _output_positions(abs_x, conv)
    per_group = filters // groups
    budget = budget or ChunkBudget()
    step = max(1, min(budget.patch_elements // max(channels * taps * positions, 1), budget.product_elements // max(channels * per_group, 1)))
    total = torch.zeros(channels, per_group, dtype=torch.float64, device=abs_x.device)
    for start in range(0, batch, step):
        patches = conv_patches(abs_x[start : start + step], conv)  # (b, C, taps, L)
        gram = patches @ patches.transpose(-1, -2)  # (b, C, k2, k2)
        upper = gram[:, :, iu, ju].transpose(0, 1)  # (C, b, T)
        squared = torch.bmm(upper, products)  # (C, b, J/g)
        total += squared.clamp_(min=0).sqrt_().sum(1).double()
    return total.view(groups, group_channels, per_group).permute(0, 2, 1).reshape(filters, group_channels).contiguous()


def conv_mean_map_norms(mean_abs_x: Tensor, abs_weight: Tensor, conv: torch.nn.Module | ConvGeometry) -> Tensor:
    """Authors' variant: ``|| |K_ji| * mean_n |x_ni| ||_F`` from the (C, *spatial) mean map."""
    return conv_norm_sum(mean_abs_x.unsqueeze(0), abs_weight, conv, budget=chunk_budget(mean_abs_x.device, mean_abs_x.element_size()))


def _output_positions(x: Tensor, conv: torch.nn.Module | ConvGeometry) -> int:
    """Number of output positions (h1 * h2 for a 2-d conv) of ``conv`` applied to ``x``."""
    conv = as_geometry(conv)
    pad = conv.padding
    positions = 1
    for dim in range(conv.dims):
        before = 2 * (conv.dims - 1 - dim)  # F.pad lists the last dim first
        extent = x.shape[2 + dim] + pad[before] + pad[before + 1]
        reach = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
        positions *= max((extent - reach) // conv.stride[dim] + 1, 0)
    return positions


def conv_output_positions(input_size: tuple[int, ...], conv: torch.nn.Module | ConvGeometry) -> int:
    """Output positions (h1 * h2 for a 2-d conv) for an input of spatial size ``input_size``."""
    return _output_positions(torch.empty(0, 0, *input_size), conv)


def bias_term(bias: Tensor | None, positions: int = 1) -> Tensor | None:
    """The bias' share of the signal: ``|b_j|`` (FC) or ``|b_j| * sqrt(h1 * h2)`` (conv)."""
    if bias is None:
        return None
    return bias.detach().abs().to(torch.float32) * math.sqrt(positions)


def contributions(
    module: torch.nn.Module, kind: str, entry: Mapping[str, Tensor], mode: str, weight: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """(a_ij, bias share) of one layer of family ``kind`` (``"linear"`` or ``"conv"``, see
    :mod:`nnrelief.kinds`) from the sums of its input statistics (``entry``: ``count`` and
    ``abs_input``, or ``positions`` and ``norms`` (``mode="paper"``) / ``abs_map``
    (``mode="authors"``, a map of its direct conv's input), see :mod:`nnrelief.pruning.stats`).
    ``weight`` is a Linear layer's weight laid out (out, in) when ``module.weight`` is
    stored otherwise (GPT-2's transposed ``Conv1D``). Conv contributions are (J, C/g)."""
    count = float(entry["count"])
    if kind == "linear":
        weight = (module.weight if weight is None else weight).detach().float()
        contrib = linear_contributions(weight, (entry["abs_input"].double() / count).float())
        return contrib, bias_term(module.bias)
    positions = int(round(float(entry["positions"]) / count))
    if mode == "paper":
        contrib = (entry["norms"].double() / count).float()
    else:
        mean_map = (entry["abs_map"].double() / count).float()
        layer_kind = kind_of(module)
        kernel = layer_kind.direct_kernel(module).detach().float().abs()
        contrib = conv_mean_map_norms(mean_map, kernel, layer_kind.geometry(module))
    return contrib, bias_term(module.bias, positions)


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
