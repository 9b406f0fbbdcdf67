"""Baseline pruning methods for comparisons with NNrelief at equal remaining weights.

* layer-wise magnitude pruning (Han et al., 2015): in each layer keep the largest-|value|
  weights and biases, a given number per layer;
* global magnitude pruning: keep the largest-|value| entries over all layers together;
* random pruning: keep a random subset of the given size per layer.

All of them only remove entries that are still kept (masks are ANDed, never revived) and
use the same mask containers as ``nnrelief.prune``.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from ..kinds import kind_of
from ..pruning.masks import current_mask, set_mask
from ..pruning.report import PruneReport, build_report


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of every kind the NNrelief pass prunes (:mod:`nnrelief.kinds`) by qualified name."""
    return {name: module for name, module in model.named_modules() if kind_of(module) is not None}


def _entries(module: nn.Module) -> tuple[Tensor, Tensor]:
    """Flattened |weight, bias| values and their current keep mask."""
    values = [module.weight.detach().abs().flatten()]
    masks = [current_mask(module, "weight").flatten()]
    if module.bias is not None:
        values.append(module.bias.detach().abs().flatten())
        masks.append(current_mask(module, "bias").flatten())
    return torch.cat(values), torch.cat(masks)


def _apply_flat(module: nn.Module, keep: Tensor) -> None:
    count = module.weight.numel()
    set_mask(module, "weight", keep[:count].view_as(module.weight))
    if module.bias is not None:
        set_mask(module, "bias", keep[count:])


def _top(scores: Tensor, alive: Tensor, k: int) -> Tensor:
    """Keep mask of the ``k`` highest scores among the alive entries."""
    k = max(0, min(int(k), int(alive.sum())))
    keep = torch.zeros_like(alive)
    if k:
        ranked = torch.where(alive, scores, torch.full_like(scores, -1.0))
        keep[ranked.topk(k).indices] = True
    return keep


def magnitude_prune(model: nn.Module, kept: Mapping[str, int]) -> PruneReport:
    """Layer-wise magnitude pruning to ``kept[name]`` remaining weights+biases per layer."""
    layers = prunable_layers(model)
    for name, count in kept.items():
        values, alive = _entries(layers[name])
        _apply_flat(layers[name], _top(values, alive, count))
    return build_report(((name, layers[name]) for name in kept), method="magnitude")


def random_prune(model: nn.Module, kept: Mapping[str, int], generator: torch.Generator) -> PruneReport:
    """Random pruning to ``kept[name]`` remaining weights+biases per layer."""
    layers = prunable_layers(model)
    for name, count in kept.items():
        _, alive = _entries(layers[name])
        scores = torch.rand(alive.shape, generator=generator)
        _apply_flat(layers[name], _top(scores, alive, count))
    return build_report(((name, layers[name]) for name in kept), method="random")


def global_magnitude_prune(model: nn.Module, total_kept: int, names: list[str] | None = None) -> PruneReport:
    """Keep the ``total_kept`` largest-|value| weights and biases over the given layers."""
    layers = prunable_layers(model)
    names = list(layers) if names is None else names
    pieces = [_entries(layers[name]) for name in names]
    values = torch.cat([v for v, _ in pieces])
    alive = torch.cat([a for _, a in pieces])
    keep = _top(values, alive, total_kept)
    start = 0
    for name, (piece, _) in zip(names, pieces):
        _apply_flat(layers[name], keep[start : start + piece.numel()])
        start += piece.numel()
    return build_report(((name, layers[name]) for name in names), method="global-magnitude")
