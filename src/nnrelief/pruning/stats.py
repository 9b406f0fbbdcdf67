"""Streamed collection of the statistics one NNrelief pass needs.

Observers receive the tensors at the watch points of the model's capture (or, for models
no capture handles, the layers' inputs through module pre-hooks) and accumulate fixed-size *sums over samples* plus a sample count while the
pruning batches stream through once. Memory is independent of the number of samples, and
statistics of several shards add up exactly (``add_statistics`` / ``all_reduce_statistics``).

Statistics over token positions (a Linear's input |x|, the activity of its outputs) leave
out the padding positions of batches with an ``attention_mask`` (:mod:`nnrelief.tokens`);
conv inputs and residual maps (channel-first feature maps) count every position.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from ..analysis import ChannelGraph, PrunableLayer, activity_key, graph_for, input_key, map_key, observing
from ..inputs import ModelInput
from ..kinds import kind_of
from ..tokens import current, real_tokens, row_weights, rows_counted, sum_but_last
from . import scores

log = logging.getLogger(__name__)

Statistics = dict[str, dict[str, Tensor]]
"""Observer key -> named sums (float64 or float32 tensors, and a 'count')."""


class Observer(nn.Module):
    """Accumulates one kind of statistic of the tensor it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, float | Tensor] = {}
        self.device = torch.device("cpu")

    def accumulate(self, name: str, value: Tensor) -> None:
        """Add ``value`` to the running sum ``name``."""
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def add_count(self, name: str, value: float | Tensor, seen: Tensor) -> None:
        """Add ``value`` to the count ``name`` of tensor ``seen``. Counts stay Python numbers
        while the batches stream (a device tensor made from a host number per batch would
        synchronise), or device tensors where a mask counted them (real tokens), and become
        float64 tensors on ``seen``'s device."""
        self.counts[name] = self.counts.get(name, 0.0) + value
        self.device = seen.device

    def statistics(self) -> dict[str, Tensor]:
        """The sums and counts, all tensors on the observed device."""
        counts = {name: torch.as_tensor(value, dtype=torch.float64, device=self.device) for name, value in self.counts.items()}
        return {**self.sums, **counts}

    def forward(self, x: Tensor) -> Tensor:
        """Accumulate the statistics of ``x`` (returned unchanged)."""
        self.observe(x, {})
        return x

    def observe(self, x: Tensor, memo: dict[str, Tensor]) -> None:  # pragma: no cover - overridden
        """Accumulate the statistics of ``x``; ``memo`` shares |x| and its sums between the
        observers of one tensor (see :func:`abs_of`, :func:`last_dim_sum`)."""
        raise NotImplementedError


def abs_of(x: Tensor, memo: dict[str, Tensor]) -> Tensor:
    """|x| (detached), computed once per tensor and memo."""
    if "abs" not in memo:
        memo["abs"] = x.detach().abs()
    return memo["abs"]


def last_dim_sum(x: Tensor, memo: dict[str, Tensor]) -> Tensor:
    """sum of |x| over every dim but the last (float64), real tokens only (padding left
    out, :mod:`nnrelief.tokens`), once per tensor and memo."""
    if "last" not in memo:
        memo["last"] = sum_but_last(abs_of(x, memo), row_weights(x, current()))
    return memo["last"]


class LinearInputObserver(Observer):
    """sum_n |x_ni| of a Linear input and the number of samples (token positions: real
    tokens only)."""

    def observe(self, x: Tensor, memo: dict[str, Tensor]) -> None:
        self.accumulate("abs_input", last_dim_sum(x, memo))  # = scores.linear_abs_input_sum(x)
        self.add_count("count", rows_counted(x, row_weights(x, current())), x)


class ConvInputObserver(Observer):
    """Conv input statistics: per-sample norms (paper) or the |x| map (authors), taken on the
    input of the layer's direct conv (its kind's :meth:`~nnrelief.kinds.ConvKind.direct_input`)."""

    def __init__(self, conv: nn.Module, mode: str) -> None:
        super().__init__()
        self.conv = [conv]  # a list keeps the conv out of this module's children
        self.kind = kind_of(conv)
        self.geometry = self.kind.geometry(conv)
        self.mode = mode
        self.products: Tensor | None = None
        self.budget = scores.chunk_budget(conv.weight.device, conv.weight.element_size()) if mode == "paper" else None

    def observe(self, x: Tensor, memo: dict[str, Tensor]) -> None:
        conv = self.conv[0]
        abs_x = self.kind.direct_input(conv, abs_of(x, memo))
        if self.mode == "paper":
            abs_weight = self.kind.direct_kernel(conv).detach().abs().to(abs_x.dtype)
            if self.products is None:  # the weights are fixed during a pass
                self.products = scores.kernel_products(abs_weight, conv.groups)
            self.accumulate("norms", scores.conv_norm_sum(abs_x, abs_weight, self.geometry, self.products, self.budget))
        else:
            self.accumulate("abs_map", abs_x.sum(0).double())
        count = float(x.shape[0])
        self.add_count("count", count, x)
        # Stored times the count so that shards still add up; divided by the count when read.
        positions = scores.conv_output_positions(tuple(abs_x.shape[2:]), self.geometry)
        self.add_count("positions", count * positions, x)


class ActivityObserver(Observer):
    """Per channel (along ``axis``), the sum of |x| over samples and every other position
    (along the last axis: real tokens only, so that a neuron active only on padding is dead)."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis

    def observe(self, x: Tensor, memo: dict[str, Tensor]) -> None:
        if self.axis in (-1, x.dim() - 1):
            self.accumulate("activity", last_dim_sum(x, memo))
        else:
            self.accumulate("activity", abs_of(x, memo).sum([d for d in range(x.dim()) if d != self.axis]).double())


class MapObserver(Observer):
    """Sum over samples of |x| as a (C, H, W) map, and the sample count."""

    def observe(self, x: Tensor, memo: dict[str, Tensor]) -> None:
        self.accumulate("abs_map", abs_of(x, memo).sum(0).double())
        self.add_count("count", float(x.shape[0]), x)


_INPUT_OBSERVERS = {"linear": lambda module, mode: LinearInputObserver(), "conv": ConvInputObserver}
"""A layer family (:mod:`nnrelief.kinds`) -> the observer of a layer's input statistics."""


def _input_observer(layer: PrunableLayer, mode: str) -> Observer:
    return _INPUT_OBSERVERS[layer.kind](layer.module, mode)


def _observers(graph: ChannelGraph, mode: str) -> dict[str, Observer]:
    """An observer for every watch point of the graph's capture, by key."""
    observers: dict[str, Observer] = {}
    for layer in graph.layers.values():
        observers[input_key(layer.name)] = _input_observer(layer, mode)
        ends = [call.chain_end for call in layer.calls if call.chain_end is not None]
        if ends and layer.structured:
            observers[activity_key(layer.name)] = ActivityObserver(graph.rules[ends[0]].axis)
    for join in graph.joins:
        for node in (join.branch, join.shortcut):
            observers.setdefault(map_key(node), MapObserver())
    return observers


def _pre_hook(observer: Observer):
    def hook(_module: nn.Module, args: tuple) -> None:
        observer(args[0])

    return hook


def collect(graph: ChannelGraph, inputs: Iterable[ModelInput], mode: str, model: nn.Module, skip_padding: bool = True) -> Statistics:
    """Stream ``inputs`` through ``model`` once (no grad) and return the statistics: through
    the graph's capture (a batch of another input signature, e.g. another sequence length,
    through a capture of its own), or (a graph without one) with a pre-hook on every layer.
    With ``skip_padding`` the padding positions of batches with an ``attention_mask`` are
    left out of the statistics over token positions. Layers that never ran have no entry."""
    if graph.traced:
        observers = _observers(graph, mode)
        with observing(observers):
            for x in inputs:
                same = graph_for(model, x, graph)
                if same.capture is None:
                    x(model)  # the model rejects this batch: let it say why
                with real_tokens(x, skip_padding):
                    same.capture.run(x)
    else:
        observers = {input_key(layer.name): _input_observer(layer, mode) for layer in graph.layers.values()}
        handles = [
            layer.module.register_forward_pre_hook(_pre_hook(observers[input_key(layer.name)])) for layer in graph.layers.values()
        ]
        try:
            with torch.no_grad():
                for x in inputs:
                    with real_tokens(x, skip_padding):
                        x(model)
        finally:
            for handle in handles:
                handle.remove()
    return {key: observer.statistics() for key, observer in observers.items() if observer.counts or observer.sums}


def add_statistics(first: Statistics, second: Statistics) -> Statistics:
    """Element-wise sum of two shards' statistics (same model, same keys)."""
    if first.keys() != second.keys():
        raise ValueError("statistics come from different models or settings: their keys differ")
    return {key: {name: first[key][name] + second[key][name] for name in first[key]} for key in first}


def all_reduce_statistics(stats: Statistics) -> Statistics:
    """Sum statistics over all processes of the default torch.distributed group (in place)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for key in sorted(stats):
            for name in sorted(stats[key]):
                dist.all_reduce(stats[key][name], op=dist.ReduceOp.SUM)
    return stats
