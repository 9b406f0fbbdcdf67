"""Baselines that remove the same fraction of every output row: per-row magnitude and Wanda.

Wanda (Sun et al. 2023, "A simple and effective pruning approach for large language models")
scores weight ``W_ij`` of a layer by ``|W_ij| * ||X_j||_2``, the L2 norm of input feature j
over every sample and token of the calibration batches, and keeps the same number of the
highest-scoring weights in every output row, one shot. ``norm="mean"`` takes the mean of
``|X_j||`` instead (NNrelief's input statistic; the ranking inside a row is what changes).
Per-row magnitude is the same rule on ``|W_ij|`` alone. For a conv layer a row is one
filter, (in / groups, *kernel) entries, and the norm of input channel j (over samples and
positions) scales all of its kernel's taps. Biases are kept. With ``nm=(n, m)`` every row
keeps, in each group of m consecutive inputs, its n highest-scoring weights instead (for a
conv, along the input channels at each kernel position).

Like the other baselines these only remove entries that are still kept (masks are ANDed)
and use the masks of :mod:`nnrelief.pruning.masks`. The input norms are gathered by
forward pre-hooks on the layers (one pass over the batches, no capture): written here as
Wanda's own code does it, since no maintained library exposes it for arbitrary modules.
The padding positions of batches holding an ``attention_mask`` are left out of a Linear's
input norms (:mod:`nnrelief.tokens`) unless ``skip_padding=False``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..analysis.layers import kernel_layout, module_layout
from ..inputs import batch_input
from ..kinds import kind_of
from ..pruning.masks import current_mask, set_mask
from ..pruning.nm import misfits_text, nm_misfits
from ..pruning.report import PruneReport, build_report
from ..pruning.selection import select_nm
from ..tokens import current, real_tokens, row_weights, rows_counted, sum_but_last
from .baselines import prunable_layers

__all__ = ["InputNorms", "input_norms", "row_magnitude_prune", "rows_to_keep", "wanda_prune", "wanda_scores"]

NORMS = ("l2", "mean")


class InputNorms:
    """Per input feature (channel) of every observed layer: sum of x^2, sum of |x| and the
    number of rows (samples x positions; of token positions the real tokens, given a
    ``mask``) seen, float64, on the layer's device."""

    def __init__(self) -> None:
        self.squares: dict[str, Tensor] = {}
        self.absolute: dict[str, Tensor] = {}
        self.rows: dict[str, float | Tensor] = {}

    def add(self, name: str, x: Tensor, channel_dim: int, mask: Tensor | None = None) -> None:
        """Accumulate one input tensor of layer ``name`` whose features lie along ``channel_dim``;
        with features last and ``mask`` the (B, T) real tokens of ``x`` (B, T, ..., C), its
        padding rows are left out (:func:`nnrelief.tokens.row_weights`)."""
        moved = x.detach().movedim(channel_dim, -1).double()
        weights = row_weights(moved, mask if channel_dim in (-1, x.dim() - 1) else None)
        squares, absolute = sum_but_last(moved.square(), weights), sum_but_last(moved.abs(), weights)
        if name in self.squares:
            self.squares[name] += squares
            self.absolute[name] += absolute
        else:
            self.squares[name], self.absolute[name] = squares, absolute
        self.rows[name] = self.rows.get(name, 0.0) + rows_counted(moved, weights)

    def norm(self, name: str, kind: str = "l2") -> Tensor:
        """``||X_j||_2`` (``"l2"``) or mean ``|X_j|`` (``"mean"``) per input feature of ``name``."""
        if kind not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
        if name not in self.squares:
            raise KeyError(f"layer {name} never ran on the calibration batches")
        rows = torch.as_tensor(self.rows[name], dtype=torch.float64, device=self.absolute[name].device)
        return self.squares[name].sqrt() if kind == "l2" else self.absolute[name] / rows.clamp(min=1)


@torch.no_grad()
def input_norms(model: nn.Module, batches: Iterable[Any], names: Iterable[str] | None = None, skip_padding: bool = True) -> InputNorms:
    """Stream ``batches`` (tensors, dicts of keyword inputs or (inputs, target) pairs, as
    :func:`nnrelief.prune` takes them) through ``model`` in eval mode once, gathering the
    input norms of the prunable layers ``names`` (default: all); with ``skip_padding`` a
    batch's ``attention_mask`` leaves its padding positions out."""
    layers = prunable_layers(model)
    wanted = list(layers) if names is None else list(names)
    norms = InputNorms()
    device = next(model.parameters()).device
    hooks = []
    for name in wanted:
        channel_dim = -1 if kind_of(layers[name]).family == "linear" else 1
        hooks.append(layers[name].register_forward_pre_hook(
            lambda _module, args, name=name, dim=channel_dim: norms.add(name, args[0], dim, current())))  # fmt: skip
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        for index, batch in enumerate(batches):
            model_input = batch_input(batch, index).to(device)
            with real_tokens(model_input, skip_padding):
                model_input(model)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.train(training)
    return norms


def _per_kernel(module: nn.Module, norm: Tensor) -> Tensor:
    """Per input feature values ``norm`` (C,) as (out, in / groups): filter j of group g
    reads input channels g * (C / groups) + c."""
    out, per_group = kernel_layout(module, module.weight).shape[:2]
    groups = getattr(module, "groups", 1)
    group_of_row = torch.arange(out, device=norm.device) // (out // groups)
    return norm[group_of_row[:, None] * per_group + torch.arange(per_group, device=norm.device)]


def wanda_scores(module: nn.Module, norm: Tensor) -> Tensor:
    """``|W| * norm`` in the layer's kernel layout (out, in / groups, *kernel): ``norm`` (C,)
    per input feature broadcast over each kernel's taps."""
    weight = kernel_layout(module, module.weight.detach()).abs().float()
    scale = _per_kernel(module, norm.to(weight.device, torch.float32))
    return weight * scale.view(*scale.shape, *([1] * (weight.dim() - 2)))


def rows_to_keep(module: nn.Module, kept: int) -> int:
    """Weights to keep per output row so the layer keeps about ``kept`` weights and biases
    (biases are kept): ``round((kept - biases) / rows)``, at least 0."""
    weight = kernel_layout(module, module.weight)
    biases = 0 if module.bias is None else int(current_mask(module, "bias").sum())
    return max(0, round((kept - biases) / weight.shape[0]))


def _row_top(scores: Tensor, alive: Tensor, k: int) -> Tensor:
    """(J, K) keep mask of the ``k`` highest scores among the alive entries of every row."""
    k = min(k, scores.shape[1])
    ranked = torch.where(alive, scores, torch.full_like(scores, -1.0))
    keep = torch.zeros_like(alive)
    if k > 0:
        keep.scatter_(1, ranked.topk(k, dim=1).indices, True)
    return keep & alive


def _nm_rows(scores: Tensor, alive: Tensor, nm: tuple[int, int]) -> Tensor:
    """(J, C, *kernel) keep mask of n in every m consecutive input channels at each kernel position."""
    moved = torch.where(alive, scores, torch.zeros_like(scores)).movedim(1, -1)
    keep = select_nm(moved.reshape(-1, moved.shape[-1]), *nm).view(moved.shape)
    return keep.movedim(-1, 1) & alive


def _prune_rows(module: nn.Module, scores: Tensor, kept: int | None, nm: tuple[int, int] | None) -> None:
    """Keep per row the highest ``scores`` (kernel layout): ``rows_to_keep`` of them, or n:m."""
    alive = kernel_layout(module, current_mask(module, "weight")).to(scores.device)
    if nm is not None:
        keep = _nm_rows(scores, alive, nm)
    else:
        rows = scores.shape[0]
        keep = _row_top(scores.reshape(rows, -1), alive.reshape(rows, -1), rows_to_keep(module, kept)).view_as(alive)
    set_mask(module, "weight", module_layout(module, keep))


def _names(layers: Mapping[str, nn.Module], kept: Mapping[str, int] | None, nm: tuple[int, int] | None) -> list[str]:
    """The layers to prune (those of ``kept``; all with ``nm`` alone), checked before anything changes."""
    if kept is None and nm is None:
        raise ValueError("give kept (weights and biases to keep per layer) or nm=(n, m)")
    names = list(layers if kept is None else kept)
    unknown = [name for name in names if name not in layers]
    if unknown:
        raise ValueError(f"no prunable layer called {', '.join(unknown)}; the prunable layers are {', '.join(layers)}")
    if nm is None:
        return names
    misfits = nm_misfits({name: layers[name] for name in names}, nm[1])
    if misfits:
        raise ValueError(f"{nm[0]}:{nm[1]} sparsity needs input widths divisible by {nm[1]}; not so in {misfits_text(misfits)}: "
                         "leave them out of the layers to prune")  # fmt: skip
    return names


def row_magnitude_prune(
    model: nn.Module, kept: Mapping[str, int] | None = None, *, nm: tuple[int, int] | None = None
) -> PruneReport:
    """Per-row magnitude pruning: every output row of layer ``name`` keeps its largest-|w|
    weights, ``rows_to_keep(layer, kept[name])`` of them (or n:m with ``nm``, then ``kept``
    only names the layers, default all)."""
    layers = prunable_layers(model)
    names = _names(layers, kept, nm)
    for name in names:
        module = layers[name]
        _prune_rows(module, kernel_layout(module, module.weight.detach()).abs().float(), None if kept is None else kept[name], nm)
    return build_report(((name, layers[name]) for name in names), method="row-magnitude" if nm is None else f"row-magnitude {nm[0]}:{nm[1]}")


def wanda_prune(
    model: nn.Module,
    batches: Iterable[Any],
    kept: Mapping[str, int] | None = None,
    *,
    norm: str = "l2",
    nm: tuple[int, int] | None = None,
    skip_padding: bool = True,
) -> PruneReport:
    """Wanda: every output row of layer ``name`` keeps its highest ``|W_ij| * ||X_j||``
    weights, ``rows_to_keep(layer, kept[name])`` of them (or n:m with ``nm``, then ``kept``
    only names the layers, default all); ``norm`` is ``"l2"`` (the paper) or ``"mean"``
    (mean |x|, NNrelief's statistic). ``batches`` are the calibration batches (with
    ``skip_padding``, padding positions left out of the norms)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    layers = prunable_layers(model)
    names = _names(layers, kept, nm)
    norms = input_norms(model, batches, names, skip_padding)
    for name in names:
        _prune_rows(layers[name], wanda_scores(layers[name], norms.norm(name, norm)), None if kept is None else kept[name], nm)
    method = "wanda" if norm == "l2" else "wanda-mean"
    return build_report(((name, layers[name]) for name in names), method=method if nm is None else f"{method} {nm[0]}:{nm[1]}")
