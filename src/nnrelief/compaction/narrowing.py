"""Compaction in the model's own class: its modules narrowed in place, along the channel graph.

Tensors joined by channel-wise ops (activations, BatchNorm, pooling, elementwise sums and
products) carry the same channels, so they form one *group* (union-find over graph nodes);
a group keeps channel c if any member may carry a nonzero signal there that some consumer
uses. A flatten or a concatenation of narrowed tensors is itself narrowed exactly (its kept
entries follow from its inputs'). A channel padding or a gated shortcut separates two
groups: the module returning it is wrapped in a :class:`ChannelMap` that places the kept
source channels into the kept target channels (zeros where a target has no source). What
has no in-place form (such a node that no module of its own returns, a group whose kept
channels a flatten cannot produce) makes the plan decline, and the caller uses another
route. Sliced: the layers' rows and columns and depthwise groups (as their kind says,
:meth:`nnrelief.kinds.LayerKind.slice`), BatchNorm entries, per-channel parameters
multiplied into the stream (layer scales).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..analysis import ChannelGraph, Rule
from ..analysis.capture import watch
from ..analysis.nodes import op_name, parameter_name, scope, scopes
from ..analysis.rules import BATCHNORMS
from ..kinds import kind_of

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


@dataclass
class MapEntry:
    """Index map after ``node``: output channel k <- input channel ``index[k]``; an index equal
    to the input's channel count reads an appended zero channel (``zero_fill``)."""

    node: str
    axis: int
    index: Tensor
    zero_fill: bool


class ChannelMap(nn.Module):
    """``module``'s output with its channels (dim ``axis``) re-indexed: channel k of the result
    is channel ``index[k]`` of the module's output, or zero where ``index[k]`` equals that
    output's channel count (``zero_fill``). Compaction puts it where a module pads channels
    (the option-A shortcut) or a gate drops some of a shortcut's channels."""

    def __init__(self, module: nn.Module, index: Tensor, axis: int, zero_fill: bool) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("index", index)
        self.axis = axis
        self.zero_fill = zero_fill

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        output = self.module(*args, **kwargs)
        if self.zero_fill:
            output = F.pad(output, [0, 0] * (output.dim() - 1 - self.axis) + [0, 1])
        return output.index_select(self.axis, self.index)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class Declined(Exception):
    """The forward cannot be narrowed in place without an index map; the message says why."""


class InPlacePlan:
    """Which channels every tensor keeps and the module slices that realise it."""

    def __init__(
        self,
        model: nn.Module,
        graph: ChannelGraph,
        live: dict[str, Tensor],
        used: dict[str, Tensor],
        gates: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.model = model
        self.graph = graph
        self.gates = dict(gates or {})  # shortcut node -> its gate (``live`` already drops what it gates off)
        self.gated = frozenset(self.gates)
        self.nodes = {node.name: node for node in graph.capture.graph.nodes}
        self.modules = dict(model.named_modules())
        self.groups = Groups()
        self.forced: set[str] = set()
        self.parameters: list[tuple[str, str, int]] = []  # (parameter, node, axis of the parameter)
        self.norms: dict[str, list[str]] = {}  # BatchNorm module -> its input nodes
        self.mapped: dict[str, str | None] = {}  # node followed by an index map -> the module returning it
        self.inexact: set[str] = set()
        self._exits: dict[str, set[str]] | None = None
        self._couple()
        self.keep = self._decide(live, used)

    def _channel_inputs(self, names: list[str]) -> list[str]:
        return [name for name in names if self.graph.rules[name].channels is not None]

    def _couple(self) -> None:
        rules = self.graph.rules
        for name, rule in rules.items():
            inputs = self._channel_inputs(rule.inputs)
            if rule.rule is Rule.PAD:
                self._map_at(name)
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
        for name in self.gates:
            self._map_at(name)

    def _linked(self, name: str) -> bool:
        """Whether channel-wise node ``name`` carries its inputs' channels (a gated shortcut
        does not: an index map stands between them)."""
        return name not in self.gates

    def _map_at(self, name: str) -> None:
        """Node ``name`` (a channel padding, a gated shortcut) is followed by an index map: in
        place, a :class:`ChannelMap` around the module that returns it."""
        owner = self._owner(name)
        if owner is None:
            raise Declined(f"node {name} moves channels (a padding or a gate) and no module of its own returns it")
        self.mapped[name] = owner

    def _owner(self, name: str) -> str | None:
        """The innermost module whose forward returns node ``name`` and nothing else."""
        if self._exits is None:
            self._exits = {}
            for node in self.graph.capture.graph.nodes:
                inside = set(scopes(node))
                for user in node.users:
                    if user.target is not watch:
                        for module in inside - set(scopes(user)):
                            self._exits.setdefault(module, set()).add(node.name)
        for module in reversed(scopes(self.nodes[name])):
            if module and self._exits.get(module) == {name}:
                return module
        return None

    def _inexact(self, name: str) -> None:
        """Consumers of flatten/concat ``name`` need channels its narrowed inputs do not produce."""
        raise Declined(f"node {name}: its consumers need channels its narrowed inputs would not produce")

    def _couple_layer(self, name: str, layer: str, inputs: list[str]) -> None:
        module = self.modules[layer]
        if getattr(module, "groups", 1) > 1:
            if not kind_of(module).depthwise(module):
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
        reshaped = {self.groups.find(name) for name, rule in self.graph.rules.items() if rule.rule in (Rule.FLATTEN, Rule.CAT)}
        _keep_one({root: value for root, value in demand.items() if root not in reshaped})  # before the reshapes read them
        self._exact_reshapes(keep)
        _keep_one(keep)
        return keep

    def _natural(self, name: str, keep: dict[str, Tensor]) -> Tensor:
        """The original channels node ``name`` gives once its inputs are narrowed."""
        rule = self.graph.rules[name]
        if rule.rule is Rule.FLATTEN:
            return keep[rule.inputs[0]].repeat_interleave(rule.spatial).repeat(rule.outer)
        if rule.rule is Rule.PAD:
            source = keep[rule.inputs[0]]
            front, back = rule.pad
            return torch.cat([source.new_zeros(front), source, source.new_zeros(back)])
        if rule.rule in (Rule.PASS, Rule.MERGE):
            return keep[rule.inputs[0]]
        return torch.cat([keep[source] for source in rule.inputs])

    def maps(self) -> list[MapEntry]:
        """The index maps: after each channel padding, gated shortcut and inexact flatten or
        concatenation whose kept channels differ from what its narrowed input gives."""
        maps = []
        for name in dict.fromkeys([*self.mapped, *sorted(self.inexact)]):
            rule = self.graph.rules[name]
            natural = self._natural(name, self.keep).nonzero().flatten()
            position = torch.full((rule.channels,), len(natural), dtype=torch.long)
            position[natural] = torch.arange(len(natural))
            if name in self.gates:
                position[~self.gates[name].to(position.device)] = len(natural)
            index = position[self.keep[name].nonzero().flatten()]
            if len(index) == len(natural) and torch.equal(index, torch.arange(len(natural))):
                continue
            maps.append(MapEntry(name, rule.axis, index, bool((index == len(natural)).any())))
        return maps

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
        """Slice every module and wrap the index maps' modules in :class:`ChannelMap`; returns
        the number of parameter entries removed."""
        maps = self.maps()
        removed = self.slice_modules()
        for entry in maps:
            owner = self.mapped[entry.node]
            parent, _, attribute = owner.rpartition(".")
            module = self.model.get_submodule(owner)
            index, zero_fill = self._in_module(entry)
            setattr(self.model.get_submodule(parent), attribute, ChannelMap(module, index.to(_device_of(self.model)), entry.axis, zero_fill))
        return removed

    def _in_module(self, entry: MapEntry) -> tuple[Tensor, bool]:
        """``entry``'s index into the output of its narrowed module: a padding module still
        pads (its zeros come first and last), so its kept channels sit after the front zeros
        and a zero channel is one of those it adds."""
        rule = self.graph.rules[entry.node]
        if rule.rule is not Rule.PAD:
            return entry.index, entry.zero_fill
        front, _ = rule.pad
        sources = int(self.keep[rule.inputs[0]].sum())
        zero = 0 if front else sources  # the first padded zero
        return torch.where(entry.index < sources, entry.index + front, zero), False

    def slice_modules(self) -> int:
        """Slice every module; returns the number of parameter entries removed."""
        before = sum(p.numel() for p in self.model.parameters())
        with torch.no_grad():
            for layer in self.graph.layers.values():
                call = layer.calls[0]
                if layer.structured:  # a call the rules understand: its channels are the layer's rows/columns
                    rows, cols = self.keep.get(call.node), self.keep.get(call.input_node)
                    kind_of(layer.module).slice(layer.module, _index(rows), _index(cols))
            for module_name, inputs in self.norms.items():
                _slice_batchnorm(self.modules[module_name], self.keep[inputs[0]])
            for parameter, node, axis in self.parameters:
                _slice_parameter(self.model, parameter, axis, self.keep[node])
        return before - sum(p.numel() for p in self.model.parameters())


def _keep_one(keep: Mapping[str, Tensor]) -> None:
    """Channel 0 kept where no channel is: never a zero-width layer (an extra channel is exact).
    A layer reduced to nothing thus keeps one channel on both sides of a flatten or a
    concatenation (the concatenation a branch of which died entirely keeps its channel)."""
    for value in keep.values():
        if not bool(value.any()):
            value[0] = True


def _index(mask: Tensor | None) -> Tensor | None:
    """The indices ``mask`` keeps, None where it keeps all (nothing to slice)."""
    return None if mask is None or bool(mask.all()) else mask.nonzero().flatten()


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
    sliced = tensor.detach().index_select(axis, keep.nonzero().flatten().to(tensor.device))
    if isinstance(tensor, nn.Parameter):
        setattr(owner, attribute, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        owner.register_buffer(attribute, sliced)
