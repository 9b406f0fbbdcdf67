"""Streamed collection of the statistics one NNrelief pass needs.

Observers are attached to the traced graph (or, for untraceable models, to module
pre-hooks) and accumulate fixed-size *sums over samples* plus a sample count while the
pruning batches stream through once. Memory is independent of the number of samples, and
statistics of several shards add up exactly (``add_statistics`` / ``all_reduce_statistics``).
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from . import scores
from .graph import ModelGraph, PrunableLayer
from .inputs import ModelInput, example_input
from .masks import GATE

log = logging.getLogger(__name__)

Statistics = dict[str, dict[str, Tensor]]
"""Observer key -> named sums (float64 or float32 tensors, and a 'count')."""


class Observer(nn.Module):
    """Accumulates one kind of statistic of the tensor it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, float] = {}
        self.device = torch.device("cpu")

    def accumulate(self, name: str, value: Tensor) -> None:
        """Add ``value`` to the running sum ``name``."""
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def add_count(self, name: str, value: float, seen: Tensor) -> None:
        """Add the number ``value`` to the count ``name`` of tensor ``seen``. Counts stay
        Python numbers while the batches stream (a device tensor made from a host number
        per batch would synchronise) and become float64 tensors on ``seen``'s device."""
        self.counts[name] = self.counts.get(name, 0.0) + value
        self.device = seen.device

    def statistics(self) -> dict[str, Tensor]:
        """The sums and counts, all tensors on the observed device."""
        counts = {name: torch.full((), value, dtype=torch.float64, device=self.device) for name, value in self.counts.items()}
        return {**self.sums, **counts}

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


class LinearInputObserver(Observer):
    """sum_n |x_ni| of a Linear input and the number of samples."""

    def forward(self, x: Tensor) -> Tensor:
        total, count = scores.linear_abs_input_sum(x)
        self.accumulate("abs_input", total)
        self.add_count("count", float(count), x)
        return x


class ConvInputObserver(Observer):
    """Conv input statistics: per-sample norms (paper) or the |x| map (authors)."""

    def __init__(self, conv: nn.Conv2d, mode: str) -> None:
        super().__init__()
        self.conv = [conv]  # a list keeps the conv out of this module's children
        self.mode = mode
        self.products: Tensor | None = None
        self.budget = scores.chunk_budget(conv.weight.device, conv.weight.element_size()) if mode == "paper" else None

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv[0]
        abs_x = x.detach().abs()
        if self.mode == "paper":
            abs_weight = conv.weight.detach().abs().to(abs_x.dtype)
            if self.products is None:  # the weights are fixed during a pass
                self.products = scores.kernel_products(abs_weight, conv.groups)
            self.accumulate("norms", scores.conv_norm_sum(abs_x, abs_weight, conv, self.products, self.budget))
        else:
            self.accumulate("abs_map", abs_x.sum(0).double())
        count = float(x.shape[0])
        self.add_count("count", count, x)
        # Stored times the count so that shards still add up; divided by the count when read.
        positions = scores.conv_output_positions((x.shape[2], x.shape[3]), conv)
        self.add_count("positions", count * positions, x)
        return x


class ActivityObserver(Observer):
    """Per channel (dim 1), the sum of |x| over samples and every other position."""

    def forward(self, x: Tensor) -> Tensor:
        dims = [d for d in range(x.dim()) if d != 1]
        self.accumulate("activity", x.detach().abs().sum(dims).double())
        return x


class MapObserver(Observer):
    """Sum over samples of |x| as a (C, H, W) map, and the sample count."""

    def forward(self, x: Tensor) -> Tensor:
        self.accumulate("abs_map", x.detach().abs().sum(0).double())
        self.add_count("count", float(x.shape[0]), x)
        return x


def input_key(layer: str) -> str:
    """Statistics key of a layer's input."""
    return f"input:{layer}"


def activity_key(layer: str) -> str:
    """Statistics key of a layer's post-activation output."""
    return f"activity:{layer}"


def map_key(node: str) -> str:
    """Statistics key of a node's |x| map (residual joins)."""
    return f"map:{node}"


def _input_observer(layer: PrunableLayer, mode: str) -> Observer:
    return LinearInputObserver() if layer.kind == "linear" else ConvInputObserver(layer.module, mode)


def _observers(graph: ModelGraph, mode: str) -> dict[str, tuple[str, Observer]]:
    """Observer key -> (node it watches, observer)."""
    watch: dict[str, tuple[str, Observer]] = {}
    for layer in graph.layers.values():
        watch[input_key(layer.name)] = (layer.input_node, _input_observer(layer, mode))
        if layer.chain_end is not None:
            watch[activity_key(layer.name)] = (layer.chain_end, ActivityObserver())
    for join in graph.joins:
        for node in (join.branch, join.shortcut):
            watch.setdefault(map_key(node), (node, MapObserver()))
    return watch


class GateApplier(nn.Module):
    """Applies the channel gate of a shortcut module the trace inlined (its hook can't fire)."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self.owner = [owner]  # a list keeps the owner out of this module's children

    def forward(self, x: Tensor) -> Tensor:
        gate = getattr(self.owner[0], GATE, None)
        if gate is None:
            return x
        return x * gate.view([1, -1] + [1] * (x.dim() - 2)).to(x.dtype)


def _instrument(model: nn.Module, graph: ModelGraph, watch: dict[str, tuple[str, Observer]]) -> fx.GraphModule:
    """A copy of the traced module that also calls the observers on the watched nodes and
    applies shortcut gates on paths the trace inlined."""
    gm = graph.module
    instrumented = fx.GraphModule(gm, _copy_graph(gm.graph))
    nodes = {node.name: node for node in instrumented.graph.nodes}
    modules = dict(model.named_modules())
    for index, (node_name, module_name) in enumerate(graph.gates.items()):
        node = nodes[node_name]
        if node.op == "call_module":
            continue  # the module's own forward hook applies the gate
        target = f"nnrelief_gate_{index}"
        instrumented.add_submodule(target, GateApplier(modules[module_name]))
        with instrumented.graph.inserting_after(node):
            gated = instrumented.graph.call_module(target, (node,))
        node.replace_all_uses_with(gated, delete_user_cb=lambda user, gated=gated: user is not gated)
        nodes[node_name] = gated
    for index, (node_name, observer) in enumerate(watch.values()):
        target = f"nnrelief_observer_{index}"
        instrumented.add_submodule(target, observer)
        node = nodes[node_name]
        with instrumented.graph.inserting_after(node):
            instrumented.graph.call_module(target, (node,))
    instrumented.recompile()
    return instrumented


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph()
    output = copy.graph_copy(graph, {})
    copy.output(output)
    return copy


def _pre_hook(observer: Observer):
    def hook(_module: nn.Module, args: tuple) -> None:
        observer(args[0])

    return hook


def collect(
    model: nn.Module,
    graph: ModelGraph,
    inputs: Iterable[Tensor | ModelInput],
    mode: str,
    progress: Iterator | None = None,
) -> Statistics:
    """Stream ``inputs`` (tensors or :class:`ModelInput` calls) through the model once (no
    grad) and return the statistics."""
    if graph.traced:
        watch = _observers(graph, mode)
        runner = _instrument(model, graph, watch)
        handles = []
    else:
        watch = {input_key(layer.name): ("", _input_observer(layer, mode)) for layer in graph.layers.values()}
        handles = [
            layer.module.register_forward_pre_hook(_pre_hook(watch[input_key(layer.name)][1]))
            for layer in graph.layers.values()
        ]
        runner = model
    try:
        with torch.no_grad():
            for x in inputs:
                example_input(x)(runner)
    finally:
        for handle in handles:
            handle.remove()
    return {key: observer.statistics() for key, (_node, observer) in watch.items()}


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
