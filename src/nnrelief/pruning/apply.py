"""The pass's masks applied: layer masks (connection level, expanded to whole kernels),
BatchNorm masks and shortcut gates, ANDed with what the model already has."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..analysis import ChannelGraph, weight_matrix
from ..analysis.layers import module_layout
from .cleaning import LayerMask
from .masks import model_weights, set_gate, set_mask


def flat_masks(masks: dict[str, LayerMask], gates: dict[str, Tensor], bn_masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every mask :func:`apply_pass_masks` applies, by name (to compare them across processes)."""
    flat = {f"gate:{name}": gate for name, gate in gates.items()}
    flat.update({f"bn:{name}": keep for name, keep in bn_masks.items()})
    for name, mask in masks.items():
        flat[f"weight:{name}"] = mask.weight
        if mask.bias is not None:
            flat[f"bias:{name}"] = mask.bias
    return flat


def apply_layer_masks(model: nn.Module, masks: dict[str, LayerMask], bn_masks: dict[str, Tensor]) -> None:
    """Mask layers (connection-level masks expanded to whole kernels) and BatchNorm channels
    of ``model``, ANDed with their existing masks: nothing revives. A Linear's first mask is
    its layer mask itself where it fits (the pass lets go of ``masks``)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules[name]
        shape = weight_matrix(module).shape
        weight = mask.weight.view(shape[0], shape[1], *([1] * (len(shape) - 2))).expand(shape)
        set_mask(module, "weight", module_layout(module, weight), adopt=True)
        if mask.bias is not None:
            set_mask(module, "bias", mask.bias)
    for name, keep in bn_masks.items():
        if not bool(keep.all()) or getattr(modules[name], "weight_mask", None) is not None:
            set_mask(modules[name], "weight", keep)
            set_mask(modules[name], "bias", keep)


def apply_pass_masks(
    model: nn.Module, graph: ChannelGraph, masks: dict[str, LayerMask], gates: dict[str, Tensor], bn_masks: dict[str, Tensor]
) -> None:
    """Apply a pass's layer masks, BatchNorm masks and the shortcut gates that remove something."""
    apply_layer_masks(model, masks, bn_masks)
    modules = dict(model.named_modules())
    for node, module_name in graph.gates.items():
        if not bool(gates[node].all()):
            set_gate(modules[module_name], gates[node], model_weights(model))
