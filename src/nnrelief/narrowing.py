"""Compaction in the model's own class: its modules narrowed in place, along the channel graph.

Tensors joined by channel-wise ops (activations, BatchNorm, pooling, elementwise sums and
products) carry the same channels, so they form one *group* (union-find over graph nodes);
a group keeps channel c if any member may carry a nonzero signal there that some consumer
uses. A flatten or a concatenation of narrowed tensors is itself narrowed exactly (its kept
entries follow from its inputs'), so no index map is needed; what would need one (a channel
padding, a gate on a shortcut without a BatchNorm to fold it into, a group whose kept
channels a flatten cannot produce) makes :func:`narrow_in_place` decline, and the caller
uses another route. Sliced: Linear / Conv1D / Conv2d rows and columns, depthwise groups,
BatchNorm entries, per-channel parameters multiplied into the stream (layer scales).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .analysis import ChannelGraph, Rule
from .analysis.capture import parameter_name, scope
from .analysis.rules import BATCHNORMS, op_name

log = logging.getLogger(__name__)


class Groups:
    """Union-find over node names: tensors that must carry the same channels."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


class Declined(Exception):
    """The forward cannot be narrowed in place without an index map; the message says why."""


def _is_depthwise(module: nn.Module) -> bool:
    groups = getattr(module, "groups", 1)
    return groups > 1 and module.in_channels == groups and module.out_channels == groups


class InPlacePlan:
    """Which channels every tensor keeps and the module slices that realise it."""

    def __init__(
        self, model: nn.Module, graph: ChannelGraph, live: dict[str, Tensor], used: dict[str, Tensor], gated: frozenset[str] = frozenset()
    ) -> None:
        self.model = model
        self.graph = graph
        self.gated = gated  # shortcut gate products (whose gated-off channels ``live`` already drops)
        self.nodes = {node.name: node for node in graph.capture.graph.nodes}
        self.modules = dict(model.named_modules())
        self.groups = Groups()
        self.forced: set[str] = set()
        self.parameters: list[tuple[str, str, int]] = []  # (parameter, node, axis of the parameter)
        self.norms: dict[str, list[str]] = {}  # BatchNorm module -> its input nodes
        self._couple()
        self.keep = self._decide(live, used)

    def _channel_inputs(self, names: list[str]) -> list[str]:
        return [name for name in names if self.graph.rules[name].channels is not None]

    def _couple(self) -> None:
        rules = self.graph.rules
        for name, rule in rules.items():
            inputs = self._channel_inputs(rule.inputs)
            if rule.rule is Rule.PAD:
                self._channel_pad(name)
            elif rule.rule in (Rule.PASS, Rule.MERGE) and rule.channels is not None:
                if self._linked(name):
                    for source in inputs:
                        self.groups.union(name, source)
                self._note_stateful(name, rule)
            elif rule.rule is Rule.LAYER:
                self._couple_layer(name, rule.layer, inputs)
            elif rule.rule in (Rule.OPAQUE, Rule.OUTPUT):
                self.forced.update(inputs)
        for layer in self.graph.layers.values():
            calls = layer.calls
            for call in calls[1:]:
                self.groups.union(calls[0].node, call.node)
                if self.graph.rules[call.input_node].channels is not None and self.graph.rules[calls[0].input_node].channels is not None:
                    self.groups.union(calls[0].input_node, call.input_node)
        for inputs in self.norms.values():
            for source in inputs[1:]:
                self.groups.union(inputs[0], source)

    def _linked(self, name: str) -> bool:
        """Whether channel-wise node ``name`` carries its inputs' channels (an index map may
        stand between them instead)."""
        return True

    def _channel_pad(self, name: str) -> None:
        """A zero padding along the channel axis: the in-place route cannot express it."""
        raise Declined(f"node {name} pads along channels (an index map would be needed)")

    def _inexact(self, name: str) -> None:
        """Consumers of flatten/concat ``name`` need channels its narrowed inputs do not produce."""
        raise Declined(f"node {name}: its consumers need channels its narrowed inputs would not produce")

    def _couple_layer(self, name: str, layer: str, inputs: list[str]) -> None:
        module = self.modules[layer]
        if getattr(module, "groups", 1) > 1:
            if not _is_depthwise(module) or isinstance(module, nn.ConvTranspose2d):
                self.forced.update([name, *inputs])  # whole groups only: kept as they are
            elif inputs:
                self.groups.union(name, inputs[0])  # channel c reads input channel c only

    def _note_stateful(self, name: str, rule: Any) -> None:
        """Per-channel state of a channel-wise node: a BatchNorm, a multiplied parameter."""
        node = self.nodes[name]
        if op_name(node) in BATCHNORMS:
            self.norms.setdefault(scope(node), []).append(rule.inputs[0])
            return
        if name in self.gated:
            return  # compaction folds the gate into the model: nothing to slice here
        for source in rule.inputs:
            parameter = parameter_name(self.nodes[source])
            if parameter is not None:
                shape = self.nodes[source].meta["val"].shape
                self.parameters.append((parameter, name, rule.axis - (len(self.nodes[name].meta["val"].shape) - len(shape))))
            elif self.graph.rules[source].channels is None:
                self.forced.add(name)  # a channel-sized operand we cannot slice (a derived constant)

    def _decide(self, live: dict[str, Tensor], used: dict[str, Tensor]) -> dict[str, Tensor]:
        demand: dict[str, Tensor] = {}
        for name, rule in self.graph.rules.items():
            if rule.channels is None:
                continue
            root = self.groups.find(name)
            need = torch.ones(rule.channels, dtype=torch.bool) if name in self.forced else live[name] & used[name]
            demand[root] = demand[root] | need if root in demand else need.clone()
        keep = {name: demand[self.groups.find(name)] for name, rule in self.graph.rules.items() if rule.channels is not None}
        self._exact_reshapes(keep)
        for value in keep.values():
            if not bool(value.any()):
                value[0] = True  # never build zero-width layers; an extra channel is exact
        return keep

    def _natural(self, name: str, keep: dict[str, Tensor]) -> Tensor:
        rule = self.graph.rules[name]
        if rule.rule is Rule.FLATTEN:
            return keep[rule.inputs[0]].repeat_interleave(rule.spatial).repeat(rule.outer)
        return torch.cat([keep[source] for source in rule.inputs])

    def _exact_reshapes(self, keep: dict[str, Tensor]) -> None:
        """A flatten/concat output keeps exactly what its narrowed inputs produce."""
        for name, rule in self.graph.rules.items():
            if rule.rule not in (Rule.FLATTEN, Rule.CAT):
                continue
            natural = self._natural(name, keep)
            if not torch.equal(natural | keep[name], natural):
                self._inexact(name)
            keep[name] |= natural  # the group shares the tensor: raising it raises every member

    # -- surgery

    def apply(self) -> int:
        """Slice every module; returns the number of parameter entries removed."""
        before = sum(p.numel() for p in self.model.parameters())
        with torch.no_grad():
            for layer in self.graph.layers.values():
                call = layer.calls[0]
                if layer.structured:  # a call the rules understand: its channels are the layer's rows/columns
                    _slice_layer(layer.module, self.keep.get(call.node), self.keep.get(call.input_node))
            for module_name, inputs in self.norms.items():
                _slice_batchnorm(self.modules[module_name], self.keep[inputs[0]])
            for parameter, node, axis in self.parameters:
                _slice_parameter(self.model, parameter, axis, self.keep[node])
        return before - sum(p.numel() for p in self.model.parameters())


def _index(mask: Tensor | None, device: torch.device) -> Tensor | None:
    return None if mask is None else mask.nonzero().flatten().to(device)


def _slice_layer(module: nn.Module, rows: Tensor | None, cols: Tensor | None) -> None:
    transposed = type(module).__name__ == "Conv1D" or isinstance(module, nn.ConvTranspose2d)  # weight (in, out, ...)
    weight = module.weight.detach()
    rows_idx, cols_idx = _index(rows, weight.device), _index(cols, weight.device)
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    if rows_idx is not None:
        weight = weight.index_select(out_dim, rows_idx)
    depthwise = _is_depthwise(module)
    if cols_idx is not None and not depthwise and getattr(module, "groups", 1) == 1:
        weight = weight.index_select(in_dim, cols_idx)
    module.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
    if module.bias is not None and rows_idx is not None:
        module.bias = nn.Parameter(module.bias.detach()[rows_idx].clone(), requires_grad=module.bias.requires_grad)
    out_size, in_size = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight.shape[1])
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = out_size, in_size
    elif isinstance(module, nn.ConvTranspose2d):
        module.in_channels, module.out_channels = in_size, out_size * module.groups
    elif transposed:
        module.nf = out_size
        if hasattr(module, "nx"):
            module.nx = in_size
    else:
        module.out_channels = out_size
        module.in_channels = out_size if depthwise else in_size * module.groups
        if depthwise:
            module.groups = out_size


def _slice_batchnorm(module: nn.Module, keep: Tensor) -> None:
    index = keep.nonzero().flatten()
    for name in ("weight", "bias"):
        tensor = getattr(module, name)
        if tensor is not None:
            setattr(module, name, nn.Parameter(tensor.detach()[index.to(tensor.device)].clone(), requires_grad=tensor.requires_grad))
    for name in ("running_mean", "running_var"):
        tensor = getattr(module, name)
        if tensor is not None:
            setattr(module, name, tensor[index.to(tensor.device)].clone())
    module.num_features = len(index)


def _slice_parameter(model: nn.Module, qualified: str, axis: int, keep: Tensor) -> None:
    owner_name, _, attribute = qualified.rpartition(".")
    owner = model.get_submodule(owner_name)
    tensor = getattr(owner, attribute)
    if tensor.shape[axis] != keep.numel():
        return  # broadcast along the channels: nothing to slice
    sliced = tensor.detach().index_select(axis, keep.nonzero().flatten().to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(owner, attribute, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        owner.register_buffer(attribute, sliced)
