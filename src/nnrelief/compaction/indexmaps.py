"""Compaction into a ``torch.fx.GraphModule`` with channel index maps, where the forward
cannot be narrowed in place.

Some channel moves have no in-place form: a zero padding along the channels (the option-A
shortcut of the zoo's CIFAR ResNets pads stage i's channels into stage i+1's), or a flatten
or concatenation whose consumers keep channels its narrowed inputs no longer produce. The
model's ``torch.export`` capture (the same one the pruning passes analyse) is then turned
into a plain GraphModule: its modules are sliced as in :mod:`nnrelief.compaction.narrowing`, and after
each such node an index map places the kept source channels into the kept target channels
(``constant_pad_nd`` adds one zero channel where a target channel has no source,
``index_select`` reads a constant index buffer). Sizes the capture recorded literally
(a depthwise conv's ``groups``, a view's channel size) are rewritten. The result uses ATen
ops only: it needs no nnrelief at inference, traces, exports and pickles like any
GraphModule. Its parameters keep the model's names; its leaf modules are the narrowed ones
(shown by ``print``), though the graph reads their tensors directly.
"""

from __future__ import annotations

import itertools

import torch
import torch.fx as fx
import torch.nn as nn

from ..analysis import Rule
from ..analysis.capture import watch
from ..analysis.nodes import INNER, op_name, scope
from .narrowing import Declined, InPlacePlan, MapEntry

_SIZED_VIEWS = {"view", "reshape", "_unsafe_view", "expand"}  # ops whose argument 1 lists output sizes
_MODULE_OPS = {"linear", "conv1d", "conv2d", "conv3d"}  # what a Linear/Conv module's forward records
_CONVOLUTIONS = {"conv1d": 6, "conv2d": 6, "conv3d": 6, "convolution": 8}  # op -> index of its groups argument


class MappedPlan(InPlacePlan):
    """:class:`InPlacePlan` whose index maps go into the graph (no module of its own needs to
    return a mapped node) and where an inexact flatten or concatenation gets one too instead
    of declining; :meth:`build` makes the GraphModule."""

    def _map_at(self, name: str) -> None:
        self.mapped[name] = None  # the map goes into the graph: no module needs to return the node

    def _inexact(self, name: str) -> None:
        self.inexact.add(name)

    def _couple(self) -> None:
        super()._couple()
        for name, rule in self.graph.rules.items():
            sizes = _listed_sizes(self.nodes[name])
            if rule.channels is None or sizes is None:
                continue
            others = [size for axis, size in enumerate(sizes) if axis != rule.axis]
            if -1 in others:  # the channel size cannot become the inferred one
                self.forced.update([name, *self._channel_inputs(rule.inputs)])

    def build(self, single_output: bool) -> tuple[fx.GraphModule, int]:
        """Slice the modules and rewrite the capture; returns the GraphModule and the number of
        parameter entries removed. ``single_output``: the model returns one tensor, not a tuple."""
        capture = self.graph.capture
        if not capture.dynamic_batch:
            raise Declined("the capture has a fixed batch size")
        if capture.keywords:
            raise Declined("the model takes keyword inputs")
        maps = self.maps()
        removed = self.slice_modules()
        graph, nodes = _copy(self.graph.capture.graph)
        numbers = (number for number in itertools.count() if not hasattr(self.model, f"channel_map_{number}"))
        outputs = set()
        for entry in maps:
            buffer = f"channel_map_{next(numbers)}"  # a model compacted before keeps its own maps
            self.model.register_buffer(buffer, entry.index.to(_device(self.model)))
            outputs.add(_insert_map(graph, nodes[entry.node], entry, buffer))
        for name in self.mapped:
            if self.graph.rules[name].rule is Rule.PAD:
                _drop_channel_pad(nodes[name], self.graph.rules[name].axis)
        self._rewrite_sizes(nodes)
        self._module_calls(graph, nodes, outputs)
        _plain(graph, single_output)
        module = fx.GraphModule(self.model, graph, class_name=f"Compacted{type(self.model).__name__}")
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
        module.delete_all_unused_submodules()
        _attach_leaves(module, self.model)
        return module, removed

    def _rewrite_sizes(self, nodes: dict[str, fx.Node]) -> None:
        """Literal sizes of the capture that change with the channels: a depthwise conv's
        groups, the channel entry of a view's sizes (made -1: the view infers it)."""
        for layer in self.graph.layers.values():
            groups = getattr(layer.module, "groups", 1)
            for call in layer.calls:
                node = nodes[call.node]
                position = _CONVOLUTIONS.get(op_name(node) or "")
                if position is not None and len(node.args) > position and node.args[position] != groups:
                    node.args = (*node.args[:position], groups, *node.args[position + 1 :])
        for name, rule in self.graph.rules.items():
            sizes = _listed_sizes(nodes[name]) if name in nodes else None
            if rule.channels is None or sizes is None or name in self.forced or not isinstance(sizes[rule.axis], int):
                continue
            sizes[rule.axis] = -1
            node = nodes[name]
            node.args = (node.args[0], sizes, *node.args[2:])

    def _module_calls(self, graph: fx.Graph, nodes: dict[str, fx.Node], maps: set[fx.Node]) -> None:
        """Layer and BatchNorm calls back as calls of their (narrowed) modules, where the
        capture shows the module's plain forward on the module's input (or on an index map
        inserted before it): the result counts MACs, trains and prunes like the model."""
        for layer in self.graph.layers.values():
            for call in layer.calls:
                node = nodes[call.node]
                source = node.args[0] if node.args else None
                plain = source is nodes[call.input_node] or source in maps  # else ops of the module's own before it
                if plain and op_name(node) in _MODULE_OPS and _reads_own(node, layer.name, 2):
                    _call_module(graph, node, layer.name, source)
        for name, module in self.graph.batchnorms.items():
            node = nodes[name]
            if op_name(node) == "batch_norm" or op_name(node) == "_native_batch_norm_legit_no_training":
                result = node if op_name(node) == "batch_norm" else _first_item(node)
                if result is not None and _reads_own(node, module, 4):
                    _call_module(graph, result, module, node.args[0])


def _reads_own(node: fx.Node, module: str, tensors: int) -> bool:
    """Whether ``node`` ran in ``module``'s forward and the parameters it reads (its
    ``tensors`` arguments after the input, None for a missing bias) are the module's own."""
    if scope(node) != module:
        return False
    for arg in node.args[1 : 1 + tensors]:
        if arg is None:
            continue
        if not isinstance(arg, fx.Node) or arg.op != "get_attr" or arg.target.rpartition(".")[0] != f"{INNER}.{module}":
            return False
    return True


def _first_item(node: fx.Node) -> fx.Node | None:
    items = [user for user in node.users if op_name(user) == "getitem"]
    first = [user for user in items if user.args[1] == 0]
    return first[0] if len(first) == 1 and len(items) == len(node.users) else None


def _call_module(graph: fx.Graph, node: fx.Node, module: str, source: fx.Node) -> None:
    with graph.inserting_after(node):
        call = graph.call_module(module, (source,))
    node.replace_all_uses_with(call)


def _copy(graph: fx.Graph) -> tuple[fx.Graph, dict[str, fx.Node]]:
    """A copy of ``graph`` owned by no module (plain code generation), and its nodes by the
    names of the nodes they copy."""
    copied = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    copied.output(copied.graph_copy(graph, env))
    return copied, {node.name: env[node] for node in graph.nodes if node in env}


def _listed_sizes(node: fx.Node) -> list | None:
    """The output sizes a view-like node lists (a copy), or None."""
    if op_name(node) not in _SIZED_VIEWS or len(node.args) < 2:
        return None
    sizes = node.args[1]
    return list(sizes) if isinstance(sizes, (list, tuple)) else None


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _insert_map(graph: fx.Graph, node: fx.Node, entry: MapEntry, buffer: str) -> fx.Node:
    """Insert ``entry``'s map after ``node`` for all its users; returns the map's output."""
    users = list(node.users)
    ndim = node.meta["val"].dim()
    with graph.inserting_after(node):
        index = graph.get_attr(buffer)
    current, anchor = node, index
    if entry.zero_fill:
        pad = [0, 0] * (ndim - 1 - entry.axis) + [0, 1]
        with graph.inserting_after(index):
            current = anchor = graph.call_function(torch.ops.aten.constant_pad_nd.default, (node, pad, 0.0))
    with graph.inserting_after(anchor):
        selected = graph.call_function(torch.ops.aten.index_select.default, (current, entry.axis, index))
    for user in users:
        user.replace_input_with(node, selected)
    return selected


def _drop_channel_pad(node: fx.Node, axis: int) -> None:
    """Remove the channel part of a zero padding (the index map after it places the channels)."""
    pad = list(node.args[1])
    pair = node.args[0].meta["val"].dim() - 1 - axis
    pad[2 * pair] = pad[2 * pair + 1] = 0
    if any(pad):
        node.args = (node.args[0], pad, *node.args[2:])
    else:
        node.replace_all_uses_with(node.args[0])
        node.graph.erase_node(node)


def _plain(graph: fx.Graph, single_output: bool) -> None:
    """The capture as a plain graph of the model: positional inputs, the model's own output
    structure, parameter names without the capture wrapper's prefix, no watch points, no
    export guards, no identity views, no stale metadata."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is watch:
            graph.erase_node(node)
        elif node.op == "call_module" and node.target == "_guards_fn":  # export's input guards
            graph.erase_node(node)
        elif op_name(node) == "view_as" and node.args[0] is node.args[1]:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target.startswith(INNER + "."):
            node.target = node.target[len(INNER) + 1 :]
        node.meta = {}
        node.type = None
    output = next(node for node in graph.nodes if node.op == "output")
    if single_output:
        output.args = (output.args[0][0],)


def _attach_leaves(module: fx.GraphModule, model: nn.Module) -> None:
    """Put the model's narrowed leaf modules where the GraphModule has bare containers for
    their tensors, so that the result prints and reads like the model (``.fc1.in_features``)."""
    owners = {target.rpartition(".")[0] for target in (n.target for n in module.graph.nodes if n.op == "get_attr")}
    for owner in sorted(owners - {""}):
        original = model.get_submodule(owner)
        if list(original.children()):
            continue
        parent, _, attribute = owner.rpartition(".")
        setattr(module.get_submodule(parent), attribute, original)
