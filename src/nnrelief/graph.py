"""The ``torch.fx`` channel graph that compaction's GraphModule route still uses.

Pruning passes and in-place compaction use :mod:`nnrelief.analysis` (one ``torch.export``
capture for every model). This module remains for compacting models whose channels need
index maps (the zoo's option-A pad shortcuts): a ``torch.fx`` trace is a GraphModule that
can hold them. The model is traced and every graph node gets a *channel rule*: how the
channels (dim 1) of its output relate to the channels of its inputs. Two propagations over
these rules drive structure cleaning:

* ``live``  (forward):  which channels of a node can carry a nonzero signal;
* ``used``  (backward): which channels of a node reach a connection that is still kept,
  the model output, or an operation the graph does not understand.

Unknown operations are treated conservatively (everything live and used), so an
unrecognised model part can only make cleaning remove less, never produce a wrong mask.
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.fx.passes.shape_prop import ShapeProp

from .analysis.layers import LayerCall, find_layers
from .analysis.rules import NodeRule, Rule
from .analysis.structure import ResidualJoin
from .inputs import ModelInput, example_input

log = logging.getLogger(__name__)

# Elementwise or pooling modules that map a zero channel to a zero channel.
_ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink,
    nn.Hardshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d,
)
# Channel-wise modules whose output is nonzero on a zero input (a constant signal).
_CONSTANT_MAKING_MODULES: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, nn.LogSigmoid, nn.AlphaDropout,
)
_ZERO_PRESERVING_FUNCTIONS: set[Callable[..., Any]] = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardtanh, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, torch.clone,
}
_CONSTANT_MAKING_FUNCTIONS: set[Callable[..., Any]] = {torch.sigmoid, F.sigmoid, F.softplus, F.hardsigmoid}
_ZERO_PRESERVING_METHODS = {
    "relu", "relu_", "tanh", "contiguous", "clone", "float", "double", "half", "to", "type_as", "detach",
}
_CONSTANT_MAKING_METHODS = {"sigmoid", "exp"}
_RESHAPES_FUNCTIONS: set[Callable[..., Any]] = {torch.flatten, torch.reshape}
_RESHAPES_METHODS = {"flatten", "view", "reshape"}
_REDUCTION_FUNCTIONS: set[Callable[..., Any]] = {torch.mean, torch.sum, torch.amax}
_REDUCTION_METHODS = {"mean", "sum", "amax"}
_ADDITIVE = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_PRODUCTS = {operator.mul, operator.imul, torch.mul}
_MULTIPLICATIVE = _PRODUCTS | {operator.truediv, operator.itruediv, torch.div}
_SHAPE_QUERIES = {"size", "dim"}


@dataclass
class PrunableLayer:
    """A Linear (or transposed Conv1D) or Conv2d layer that NNrelief scores and masks."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv"
    transposed: bool = False  # weight stored (in, out): a Hugging Face Conv1D (GPT-2)
    node: str | None = None
    input_node: str | None = None
    chain_end: str | None = None
    structured: bool = False
    input_hw: tuple[int, int] | None = None
    batchnorm: str | None = None  # an affine BatchNorm reading this layer's output alone

    @property
    def calls(self) -> list[LayerCall]:
        """The layer's one traced call (the shape :func:`nnrelief.cleaning.clean` reads)."""
        return [LayerCall(self.node, self.input_node, self.structured, self.chain_end)]


@dataclass
class ModelGraph:
    """Prunable layers of a model and, when traced, the channel rules between them."""

    layers: dict[str, PrunableLayer]
    skipped: dict[str, str]
    module: fx.GraphModule | None = None
    rules: dict[str, NodeRule] = field(default_factory=dict)
    joins: list[ResidualJoin] = field(default_factory=list)
    batchnorms: dict[str, str] = field(default_factory=dict)
    gates: dict[str, str] = field(default_factory=dict)

    @property
    def traced(self) -> bool:
        """Whether channel rules are available (structure cleaning possible)."""
        return self.module is not None


def build_graph(model: nn.Module, example: Tensor | ModelInput) -> ModelGraph:
    """Trace ``model`` and derive channel rules, using ``example`` (one input batch) for shapes.

    If ``torch.fx`` cannot trace the model, a graph without channel rules is returned.
    """
    example = example_input(example).head(1)
    positional = _positional(model, example)  # a keyword the model lacks is the caller's error
    found, skipped = find_layers(model)
    layers = {name: PrunableLayer(name, layer.module, layer.kind, layer.transposed) for name, layer in found.items()}
    try:
        gm = fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means "no graph"
        log.debug("torch.fx could not trace %s (%s: %s)", type(model).__name__, type(error).__name__, error)
        return ModelGraph(layers, skipped)
    ShapeProp(gm).propagate(*positional)
    graph = ModelGraph(layers, skipped, module=gm)
    _check_single_use(graph)
    _derive_rules(graph)
    _find_chains(graph)
    _find_joins(graph, dict(model.named_modules()))
    for name, reason in graph.skipped.items():
        log.warning("layer %s left unpruned: %s", name, reason)
    return graph


def _positional(model: nn.Module, example: ModelInput) -> tuple[Any, ...]:
    """The example as positional arguments of ``model.forward`` (defaults filled in)."""
    if not example.kwargs:
        return example.args
    try:
        bound = inspect.signature(model.forward).bind(*example.args, **example.kwargs)
    except TypeError as error:
        raise TypeError(f"{type(model).__name__}.forward does not take these inputs {example.describe()}: {error}") from error
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _check_single_use(graph: ModelGraph) -> None:
    """Layers called more than once (shared weights) see mixed inputs: leave them unpruned."""
    calls: dict[str, int] = {}
    for node in graph.module.graph.nodes:
        if node.op == "call_module" and node.target in graph.layers:
            calls[node.target] = calls.get(node.target, 0) + 1
    for name in list(graph.layers):
        count = calls.get(name, 0)
        if count != 1:
            reason = "never called in the traced forward" if count == 0 else f"called {count} times (shared weights)"
            graph.skipped[name] = reason
            del graph.layers[name]


def _tensor_shape(node: fx.Node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None) if meta is not None else None


def _channels(node: fx.Node) -> int | None:
    shape = _tensor_shape(node)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in node.all_input_nodes if _tensor_shape(arg) is not None]


def _is_full_slice(index: Any) -> bool:
    return isinstance(index, slice) and index == slice(None, None, None)


def _derive_rules(graph: ModelGraph) -> None:
    gm = graph.module
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        graph.rules[node.name] = _rule_for(graph, node, modules)


def _rule_for(graph: ModelGraph, node: fx.Node, modules: dict[str, nn.Module]) -> NodeRule:
    channels = _channels(node)
    inputs = [arg.name for arg in _tensor_inputs(node)]
    if node.op == "output":
        return NodeRule(Rule.OUTPUT, inputs, None)
    if node.op in ("placeholder", "get_attr"):
        return NodeRule(Rule.INPUT, [], channels)
    if _tensor_shape(node) is None:
        shape_query = node.op == "call_method" and node.target in _SHAPE_QUERIES
        shape_query |= node.op == "call_function" and node.target is getattr
        return NodeRule(Rule.IGNORE if shape_query else Rule.OPAQUE, inputs, None)
    if node.op == "call_module":
        return _module_rule(graph, node, modules[node.target], inputs, channels)
    if node.op == "call_function":
        return _function_rule(node, inputs, channels)
    if node.op == "call_method":
        return _method_rule(node, inputs, channels)
    return NodeRule(Rule.OPAQUE, inputs, channels)


def _passthrough(node: fx.Node, inputs: list[str], channels: int | None, zero_preserving: bool) -> NodeRule:
    """A single-input op keeping the channel dim; opaque if the shapes say otherwise."""
    sources = _tensor_inputs(node)
    if len(sources) != 1 or channels is None or _channels(sources[0]) != channels:
        return NodeRule(Rule.OPAQUE, inputs, channels)
    return NodeRule(Rule.PASS, inputs, channels, zero_preserving=zero_preserving)


def _module_rule(graph: ModelGraph, node: fx.Node, module: nn.Module, inputs: list[str], channels: int | None) -> NodeRule:
    if node.target in graph.layers:
        layer = graph.layers[node.target]
        source = _tensor_inputs(node)[0]
        in_shape = _tensor_shape(source)
        layer.node, layer.input_node = node.name, source.name
        layer.structured = (layer.kind == "linear" and len(in_shape) == 2) or (
            isinstance(module, nn.Conv2d) and len(in_shape) == 4
        )
        if layer.kind == "conv":
            layer.input_hw = (int(in_shape[2]), int(in_shape[3]))
        rule = Rule.LAYER if layer.structured else Rule.OPAQUE
        return NodeRule(rule, inputs, channels, layer=node.target)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        rule = _passthrough(node, inputs, channels, zero_preserving=module.affine)
        if rule.rule is Rule.PASS and module.affine:
            graph.batchnorms[node.name] = node.target
        return rule
    if isinstance(module, _ZERO_PRESERVING_MODULES):
        return _passthrough(node, inputs, channels, zero_preserving=True)
    if isinstance(module, _CONSTANT_MAKING_MODULES):
        return _passthrough(node, inputs, channels, zero_preserving=False)
    if isinstance(module, nn.Flatten):
        return _reshape_rule(node, inputs, channels)
    return NodeRule(Rule.OPAQUE, inputs, channels)


def _function_rule(node: fx.Node, inputs: list[str], channels: int | None) -> NodeRule:
    target = node.target
    if target in _ZERO_PRESERVING_FUNCTIONS:
        return _passthrough(node, inputs, channels, zero_preserving=True)
    if target in _CONSTANT_MAKING_FUNCTIONS:
        return _passthrough(node, inputs, channels, zero_preserving=False)
    if target in _RESHAPES_FUNCTIONS:
        return _reshape_rule(node, inputs, channels)
    if target in _REDUCTION_FUNCTIONS:
        return _reduction_rule(node, inputs, channels)
    if target in _ADDITIVE or target in _MULTIPLICATIVE:
        return _merge_rule(node, inputs, channels, additive=target in _ADDITIVE, product=target in _PRODUCTS)
    if target is operator.getitem:
        index = node.args[1]
        full = _is_full_slice(index) or (
            isinstance(index, tuple) and len(index) >= 2 and _is_full_slice(index[0]) and _is_full_slice(index[1])
        )
        if full and isinstance(node.args[0], fx.Node) and _tensor_shape(node.args[0]) is not None:
            return _passthrough(node, inputs, channels, zero_preserving=True)
        return NodeRule(Rule.OPAQUE, inputs, channels)
    if target is torch.cat:
        return _cat_rule(node, inputs, channels)
    if target is F.pad:
        return _pad_rule(node, inputs, channels)
    return NodeRule(Rule.OPAQUE, inputs, channels)


def _method_rule(node: fx.Node, inputs: list[str], channels: int | None) -> NodeRule:
    name = node.target
    if name in _ZERO_PRESERVING_METHODS:
        return _passthrough(node, inputs, channels, zero_preserving=True)
    if name in _CONSTANT_MAKING_METHODS:
        return _passthrough(node, inputs, channels, zero_preserving=False)
    if name in _RESHAPES_METHODS:
        return _reshape_rule(node, inputs, channels)
    if name in _REDUCTION_METHODS:
        return _reduction_rule(node, inputs, channels)
    if name in ("add", "add_", "sub", "sub_"):
        return _merge_rule(node, inputs, channels, additive=True)
    if name in ("mul", "mul_", "div", "div_"):
        return _merge_rule(node, inputs, channels, additive=False, product=name in ("mul", "mul_"))
    return NodeRule(Rule.OPAQUE, inputs, channels)


def _reshape_rule(node: fx.Node, inputs: list[str], channels: int | None) -> NodeRule:
    sources = _tensor_inputs(node)
    if len(sources) != 1:
        return NodeRule(Rule.OPAQUE, inputs, channels)
    before, after = _tensor_shape(sources[0]), _tensor_shape(node)
    if len(before) >= 3 and len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]):
        return NodeRule(Rule.FLATTEN, inputs, channels, spatial=math.prod(before[2:]))
    if len(before) >= 2 and len(after) >= 2 and tuple(before[:2]) == tuple(after[:2]):
        return NodeRule(Rule.PASS, inputs, channels)
    return NodeRule(Rule.OPAQUE, inputs, channels)


def _reduction_rule(node: fx.Node, inputs: list[str], channels: int | None) -> NodeRule:
    sources = _tensor_inputs(node)
    before, after = (_tensor_shape(sources[0]) if len(sources) == 1 else None), _tensor_shape(node)
    if before is not None and len(before) >= 2 and len(after) >= 2 and tuple(before[:2]) == tuple(after[:2]):
        return NodeRule(Rule.PASS, inputs, channels)
    return NodeRule(Rule.OPAQUE, inputs, channels)


def _merge_rule(node: fx.Node, inputs: list[str], channels: int | None, additive: bool, product: bool = False) -> NodeRule:
    """Elementwise op: same-channel tensor operands merge; anything else is a constant."""
    if channels is None:
        return NodeRule(Rule.OPAQUE, inputs, channels)
    operands = list(node.args) + list(node.kwargs.values())
    merged: list[str] = []
    constant = False
    for operand in operands:
        if isinstance(operand, fx.Node) and _tensor_shape(operand) is not None:
            if _channels(operand) == channels and len(_tensor_shape(operand)) == len(_tensor_shape(node)):
                merged.append(operand.name)
            else:
                return NodeRule(Rule.OPAQUE, inputs, channels)
        elif isinstance(operand, (int, float)):
            constant |= operand != 0
        elif operand is not None:
            constant = True
    if not merged:
        return NodeRule(Rule.OPAQUE, inputs, channels)
    return NodeRule(Rule.MERGE, merged, channels, zero_preserving=not (additive and constant), product=product)


def _cat_rule(node: fx.Node, inputs: list[str], channels: int | None) -> NodeRule:
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = _tensor_shape(node)
    if channels is None or not isinstance(parts, (list, tuple)) or dim not in (1, 1 - len(shape)):
        return NodeRule(Rule.OPAQUE, inputs, channels)
    if not all(isinstance(part, fx.Node) and _channels(part) is not None for part in parts):
        return NodeRule(Rule.OPAQUE, inputs, channels)
    return NodeRule(Rule.CAT, [part.name for part in parts], channels)


def _pad_rule(node: fx.Node, inputs: list[str], channels: int | None) -> NodeRule:
    source = node.args[0]
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    shape = _tensor_shape(source) if isinstance(source, fx.Node) else None
    if shape is None or channels is None or mode != "constant" or value not in (None, 0, 0.0):
        return NodeRule(Rule.OPAQUE, inputs, channels)
    pairs = len(pad) // 2
    channel_pair = len(shape) - 2  # pad pairs run from the last dim backwards
    front, back = (pad[2 * channel_pair], pad[2 * channel_pair + 1]) if pairs > channel_pair else (0, 0)
    if front < 0 or back < 0:
        return NodeRule(Rule.OPAQUE, inputs, channels)
    return NodeRule(Rule.PAD, [source.name], channels, pad=(front, back))


def _find_chains(graph: ModelGraph) -> None:
    """For each layer, the last node of the single-user pass chain after it (post-activation)."""
    nodes = {node.name: node for node in graph.module.graph.nodes}
    for layer in graph.layers.values():
        if not layer.structured:
            continue
        current = nodes[layer.node]
        if len(current.users) == 1 and next(iter(current.users)).name in graph.batchnorms:
            layer.batchnorm = graph.batchnorms[next(iter(current.users)).name]
        while len(current.users) == 1:
            user = next(iter(current.users))
            rule = graph.rules[user.name]
            if rule.rule is not Rule.PASS or rule.inputs != [current.name]:
                break
            current = user
        layer.chain_end = current.name


def _module_returning(node: fx.Node, consumer: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The submodule whose forward returns ``node`` (to hook a gate on), if unambiguous."""
    if node.op == "call_module":
        return node.target
    stack = list(node.meta.get("nn_module_stack", {}).values())
    outer = {entry[0] for entry in consumer.meta.get("nn_module_stack", {}).values()}
    if not stack or stack[-1][0] in outer:
        return None
    path = stack[-1][0]
    return path if path in modules else None


def _find_joins(graph: ModelGraph, modules: dict[str, nn.Module]) -> None:
    """Additions of exactly one conv branch and one shortcut path (the residual rule)."""
    nodes = {node.name: node for node in graph.module.graph.nodes}
    branch_of = {layer.chain_end: layer.name for layer in graph.layers.values() if layer.kind == "conv" and layer.chain_end}
    for node in graph.module.graph.nodes:
        rule = graph.rules[node.name]
        if rule.rule is not Rule.MERGE or node.target not in (operator.add, operator.iadd, torch.add) or len(rule.inputs) != 2:
            continue
        if _tensor_shape(node) is None or len(_tensor_shape(node)) != 4:
            continue
        branches = [name for name in rule.inputs if name in branch_of]
        if len(branches) != 1 or rule.inputs[0] == rule.inputs[1]:
            continue
        branch = branches[0]
        shortcut = rule.inputs[1] if rule.inputs[0] == branch else rule.inputs[0]
        shortcut_node = nodes[shortcut]
        gate = None
        if len(shortcut_node.users) == 1:
            gate = _module_returning(shortcut_node, node, modules)
        if gate is None:
            log.info("residual join %s: shortcut %s cannot be gated (not the sole output of a submodule)", node.name, shortcut)
        else:
            graph.gates[shortcut] = gate
        graph.joins.append(ResidualJoin(node.name, branch_of[branch], branch, shortcut, gate))
