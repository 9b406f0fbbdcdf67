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
from .masks import current_mask, gate_of, is_masked
from .nm import nm_conv_mask, nm_linear_mask
from .selection import select
from .stats import Statistics


def _connection_mask(module: nn.Module) -> LayerMask:
    """A conv layer's current mask at connection level (whole kernels): (J, C/g)."""
    weight = kernel_layout(module, current_mask(module, "weight"))
    bias = current_mask(module, "bias")
    return LayerMask(weight.flatten(2).any(dim=2).cpu(), None if bias is None else bias.cpu(), groups=getattr(module, "groups", 1))


AlphaOf = Callable[[str, str], float]  # (layer name, kind) -> alpha
_BLOCK_ENTRIES = 1 << 20  # connections selected at once: bounds the selection's temporaries (sort, cumsum)


class Planner:
    """The masks of one pass for given alphas (selection, then structure cleaning), and the
    remaining fraction they give; the statistics are collected once.

    Memory stays within one layer's worth beyond the masks: a Linear's contributions
    ``|w_ij| * mean |x_i|`` are recomputed from its weight, block of rows by block of rows,
    whenever masks are selected (a target size selects a few dozen times); a conv's, (J, C/g)
    per kernel and costly, are computed once and kept. Selection runs on the CPU. With ``nm``
    = (n, m) the layers' masks are N:M (:mod:`.nm`; a Linear's selected on its weight's
    device) instead of the alpha rule's.
    """

    def __init__(
        self, model: nn.Module, graph: ChannelGraph, layers: dict[str, PrunableLayer], stats: Statistics, mode: str,
        nm: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        self.model, self.graph, self.layers, self.stats, self.nm = model, graph, layers, stats, nm
        self.shifts = {name: batchnorm_constant(model.get_submodule(layer.batchnorm)) for name, layer in layers.items() if layer.batchnorm}
        self.inputs: dict[str, Tensor] = {}  # Linear: mean |x_i|
        self.convs: dict[str, tuple[Tensor, Tensor | None]] = {}  # conv: (a_ij, bias share)
        self.taps: dict[str, Tensor] = {}  # conv: weight entries still kept per kernel
        for name, layer in layers.items():
            entry = stats[input_key(name)]
            if layer.kind == "linear":
                self.inputs[name] = (entry["abs_input"].double() / float(entry["count"])).float().cpu()
            else:
                contrib, bias_share = score_fns.contributions(layer.module, layer.kind, entry, mode)
                self.convs[name] = (contrib.cpu(), None if bias_share is None else bias_share.cpu())
                self.taps[name] = kernel_layout(layer.module, current_mask(layer.module, "weight")).flatten(2).sum(dim=2).cpu()
        self.total = sum(layer.module.weight.numel() + _numel(layer.module.bias) for layer in layers.values())
        modules = dict(model.named_modules())
        self.gates = {}
        for node, module_name in graph.gates.items():
            existing = gate_of(modules[module_name])
            self.gates[node] = existing.cpu() if existing is not None else torch.ones(graph.rules[node].channels, dtype=torch.bool)

    def masks(self, alpha_of: AlphaOf) -> tuple[dict[str, LayerMask], dict[str, Tensor], dict[str, Tensor]]:
        """(layer masks, shortcut gates, BatchNorm masks) of the pass."""
        masks = {name: self._layer_mask(name, alpha_of(name, layer.kind)) for name, layer in self.layers.items()}
        gates = {node: gate.clone() for node, gate in self.gates.items()}
        bn_masks: dict[str, Tensor] = {}
        if self.graph.traced:
            _remove_dead(self.graph, self.stats, masks)
            _residual_rule(self.graph, self.stats, masks, gates, lambda layer: alpha_of(layer, "conv"))
            bn_masks = clean(self.graph, masks, gates)
        return masks, gates, bn_masks

    def current(self) -> float:
        """kept / total weights and biases of the layers before the pass (under their old masks)."""
        kept = sum(_kept(layer.module, "weight") + _kept(layer.module, "bias") for layer in self.layers.values())
        return kept / self.total if self.total else 1.0

    def remaining(self, alpha_of: AlphaOf) -> float:
        """kept / total weights and biases of the layers under the pass's masks (as the report counts)."""
        masks, _, _ = self.masks(alpha_of)
        return sum(self.kept_counts(masks).values()) / self.total if self.total else 1.0

    def kept_counts(self, masks: dict[str, LayerMask]) -> dict[str, int]:
        """Per layer, the weights and biases ``masks`` keep."""
        return {name: (int((self.taps[name] * mask.weight).sum()) if name in self.taps else int(mask.weight.sum()))
                      + (0 if mask.bias is None else int(mask.bias.sum())) for name, mask in masks.items()}  # fmt: skip

    def layer_total(self, name: str) -> int:
        """All weights and biases of layer ``name``."""
        module = self.layers[name].module
        return module.weight.numel() + _numel(module.bias)

    def layer_current(self, name: str) -> float:
        """kept / total weights and biases of layer ``name`` before the pass."""
        module = self.layers[name].module
        return (_kept(module, "weight") + _kept(module, "bias")) / self.layer_total(name)

    def layer_remaining(self, name: str, alpha: float) -> float:
        """kept / total weights and biases of layer ``name`` under its own selection at
        ``alpha`` (before structure cleaning, which couples the layers)."""
        return self.kept_counts({name: self._selected(name, alpha)})[name] / self.layer_total(name)

    def _layer_mask(self, name: str, alpha: float) -> LayerMask:
        """One layer's keep mask: the alpha rule's (:meth:`_selected`), or the N:M one."""
        if self.nm is None:
            return self._selected(name, alpha)
        if name in self.convs:
            return nm_conv_mask(self.convs[name][0], _connection_mask(self.layers[name].module), self.nm, self.shifts.get(name))
        return nm_linear_mask(self.layers[name].module, self.inputs[name], self.nm, self.shifts.get(name), _BLOCK_ENTRIES)

    def _selected(self, name: str, alpha: float) -> LayerMask:
        """One layer's keep mask at ``alpha``, ANDed with its current mask (never revives)."""
        module = self.layers[name].module
        if name in self.convs:
            old = _connection_mask(module)
            keep_weight, keep_bias = select(*self.convs[name], alpha)
            keep_bias = None if keep_bias is None else keep_bias & old.bias
            return LayerMask(keep_weight & old.weight, keep_bias, self.shifts.get(name), old.groups)
        weight, bias = weight_matrix(module).detach(), module.bias
        keep_weight = kernel_layout(module, torch.empty(module.weight.shape, dtype=torch.bool))  # stored as the module's: adopted
        keep_bias = None if bias is None else torch.empty(weight.shape[0], dtype=torch.bool)
        inputs = self.inputs[name].to(weight.device)
        rows = max(1, _BLOCK_ENTRIES // max(1, weight.shape[1]))
        for start in range(0, weight.shape[0], rows):
            block = slice(start, start + rows)
            contrib = score_fns.linear_contributions(weight[block].float(), inputs).cpu()
            bias_share = None if bias is None else score_fns.bias_term(bias[block]).cpu()
            keep_weight[block], kept_bias = select(contrib, bias_share, alpha)
            if keep_bias is not None:
                keep_bias[block] = kept_bias
        if is_masked(module, "weight"):
            keep_weight &= kernel_layout(module, current_mask(module, "weight")).cpu()
        if keep_bias is not None and is_masked(module, "bias"):
            keep_bias &= current_mask(module, "bias").cpu()
        return LayerMask(keep_weight, keep_bias, self.shifts.get(name))


def _numel(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel()


def _kept(module: nn.Module, name: str) -> int:
    """Entries of ``module.<name>`` its current mask keeps (all when unmasked, 0 when absent)."""
    if is_masked(module, name):
        return int(current_mask(module, name).sum())
    return _numel(getattr(module, name, None))


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
