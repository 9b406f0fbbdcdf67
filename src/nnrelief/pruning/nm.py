"""N:M sparsity in a pass (``nnrelief.prune(model, batches, nm=(n, m))``): instead of the
alpha rule, every output neuron keeps, in each group of m consecutive inputs, the n
connections of highest NNrelief score (:func:`.selection.select_nm`); a conv keeps n of every
m consecutive input channels' kernels per filter. Biases keep their current mask. Both
AND with the layer's current mask (nothing revives)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from ..analysis import weight_matrix
from ..analysis.layers import kernel_layout
from . import scores as score_fns
from .cleaning import LayerMask
from .masks import current_mask
from .selection import select_nm


def nm_misfits(layers: Mapping[str, nn.Module], m: int) -> dict[str, int]:
    """The layers whose input width (conv: input channels per group) does not split into
    groups of ``m``, with that width."""
    widths = {name: kernel_layout(module, module.weight).shape[1] for name, module in layers.items()}
    return {name: width for name, width in widths.items() if width % m}


def misfits_text(misfits: Mapping[str, int]) -> str:
    """``"conv1 (3 inputs), ..."`` for an error message."""
    return ", ".join(f"{name} ({width} inputs)" for name, width in misfits.items())


def nm_linear_mask(module: nn.Module, mean_abs_input: Tensor, nm: tuple[int, int], shift: Tensor | None, block_entries: int) -> LayerMask:
    """A Linear (or GPT-2 ``Conv1D``) layer's N:M keep mask from ``a_ij = |w_ij| mean |x_i|``,
    selected ``block_entries`` connections at a time on the weight's device."""
    weight = weight_matrix(module).detach()
    mean_abs_input = mean_abs_input.to(weight.device)
    keep = torch.empty(weight.shape, dtype=torch.bool)
    rows = max(1, block_entries // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        block = slice(start, start + rows)
        contrib = score_fns.linear_contributions(weight[block].float(), mean_abs_input)
        keep[block] = select_nm(contrib, *nm).cpu()
    keep &= kernel_layout(module, current_mask(module, "weight")).cpu()
    return LayerMask(keep, _current_bias(module), shift)


def nm_conv_mask(contrib: Tensor, old: LayerMask, nm: tuple[int, int], shift: Tensor | None) -> LayerMask:
    """A conv layer's N:M keep mask at kernel level, (J, C/g), from its kernel scores and its
    current mask ``old``."""
    bias = None if old.bias is None else old.bias.clone()
    return LayerMask(select_nm(contrib, *nm) & old.weight, bias, shift, old.groups)


def _current_bias(module: nn.Module) -> Tensor | None:
    """A copy of the bias' current mask on the CPU (None without a bias)."""
    mask = current_mask(module, "bias")
    return None if mask is None else mask.to("cpu", copy=True)
