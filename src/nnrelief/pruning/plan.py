"""Scores -> selection -> cleaning: the masks of one pass for given alphas, from its
statistics (computed once, selected from as often as a target size needs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..analysis import ChannelGraph, PrunableLayer, activity_key, input_key, map_key, weight_matrix
from ..analysis.layers import kernel_layout
from . import scores as score_fns
from .cleaning import LayerMask, batchnorm_constant, clean, residual_decisions
from .masks import current_mask, gate_of
from .selection import select
from .stats import Statistics


def _connection_mask(module: nn.Module) -> LayerMask:
    weight = current_mask(module, "weight")
    weight = kernel_layout(module, weight)
    bias = current_mask(module, "bias")
    return LayerMask(
        weight.flatten(2).any(dim=2) if weight.dim() > 2 else weight.clone(),
        None if bias is None else bias.clone(),
        groups=getattr(module, "groups", 1),
    )


Contributions = dict[str, tuple[Tensor, Tensor | None]]
AlphaOf = Callable[[str, str], float]  # (layer name, kind) -> alpha


def contributions(layers: dict[str, PrunableLayer], stats: Statistics, mode: str) -> Contributions:
    """(a_ij, bias share) of every layer, on the CPU: computed once, selected from as often as needed."""
    result = {}
    for layer in layers.values():
        weight = weight_matrix(layer.module).detach()
        contrib, bias_share = score_fns.contributions(layer.module, layer.kind, stats[input_key(layer.name)], mode, weight)
        result[layer.name] = (contrib.cpu(), None if bias_share is None else bias_share.cpu())
    return result


class Planner:
    """The masks of one pass for given alphas (selection, then structure cleaning), and the
    remaining fraction they give; the statistics and contributions are computed once."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, layers: dict[str, PrunableLayer], stats: Statistics,
                 contributions: Contributions) -> None:  # fmt: skip
        self.model, self.graph, self.layers, self.stats, self.contributions = model, graph, layers, stats, contributions
        self.old = {name: _connection_mask(layer.module) for name, layer in layers.items()}
        self.shifts = {name: batchnorm_constant(model.get_submodule(layer.batchnorm)) for name, layer in layers.items() if layer.batchnorm}
        self.taps = {name: _kept_taps(layer.module) for name, layer in layers.items()}
        self.total = sum(current_mask(layer.module, "weight").numel() for layer in layers.values())
        self.total += sum(int(m.bias.numel()) for m in self.old.values() if m.bias is not None)
        modules = dict(model.named_modules())
        self.gates = {}
        for node, module_name in graph.gates.items():
            existing = gate_of(modules[module_name])
            self.gates[node] = existing.cpu() if existing is not None else torch.ones(graph.rules[node].channels, dtype=torch.bool)

    def masks(self, alpha_of: AlphaOf) -> tuple[dict[str, LayerMask], dict[str, Tensor], dict[str, Tensor]]:
        """(layer masks, shortcut gates, BatchNorm masks) of the pass."""
        masks = {}
        for name, layer in self.layers.items():
            contrib, bias_share = self.contributions[name]
            keep_weight, keep_bias = select(contrib, bias_share, alpha_of(name, layer.kind))
            old = self.old[name]
            masks[name] = LayerMask(
                keep_weight & old.weight.cpu(), None if keep_bias is None else keep_bias & old.bias.cpu(), self.shifts.get(name), old.groups
            )
        gates = {node: gate.clone() for node, gate in self.gates.items()}
        bn_masks: dict[str, Tensor] = {}
        if self.graph.traced:
            _remove_dead(self.graph, self.stats, masks)
            _residual_rule(self.graph, self.stats, masks, gates, lambda layer: alpha_of(layer, "conv"))
            bn_masks = clean(self.graph, masks, gates)
        return masks, gates, bn_masks

    def current(self) -> float:
        """kept / total weights and biases of the layers before the pass (under their old masks)."""
        kept = sum(int((self.taps[name] * old.weight.to(self.taps[name].device)).sum()) for name, old in self.old.items())
        kept += sum(int(old.bias.sum()) for old in self.old.values() if old.bias is not None)
        return kept / self.total if self.total else 1.0

    def remaining(self, alpha_of: AlphaOf) -> float:
        """kept / total weights and biases of the layers under the pass's masks (as the report counts)."""
        masks, _, _ = self.masks(alpha_of)
        kept = sum(int((self.taps[name] * mask.weight).sum()) for name, mask in masks.items())
        kept += sum(int(mask.bias.sum()) for mask in masks.values() if mask.bias is not None)
        return kept / self.total if self.total else 1.0


def _kept_taps(module: nn.Module) -> Tensor:
    """Per connection (kernel), how many of its weight entries are still kept: (J, C/g) int."""
    weight = kernel_layout(module, current_mask(module, "weight"))
    return weight.flatten(2).sum(dim=2).cpu() if weight.dim() > 2 else weight.long().cpu()


def _remove_dead(graph: ChannelGraph, stats: Statistics, masks: dict[str, LayerMask]) -> None:
    for name, mask in masks.items():
        entry = stats.get(activity_key(name))
        if entry is not None:
            mask.remove_neurons(entry["activity"].cpu() == 0)


def _residual_rule(
    graph: ChannelGraph, stats: Statistics, masks: dict[str, LayerMask], gates: dict[str, Tensor], alpha_of: Callable[[str], float]
) -> None:
    for join in graph.joins:
        if join.layer not in masks:
            continue  # a spared branch keeps its filters; its shortcut is left alone too
        alpha = alpha_of(join.layer)
        branch, shortcut = stats[map_key(join.branch)], stats[map_key(join.shortcut)]
        prune_branch, mask_shortcut = residual_decisions(
            (branch["abs_map"].double() / float(branch["count"])).float().cpu(),
            (shortcut["abs_map"].double() / float(shortcut["count"])).float().cpu(),
            alpha,
        )
        masks[join.layer].remove_neurons(prune_branch)
        if join.gate_module is not None:
            gates[join.shortcut] = gates[join.shortcut] & ~mask_shortcut
