"""Where the layers run in a captured graph, and the structure around them: the channel-wise
chain after each call (its post-activation output), the BatchNorm reading it, residual
joins of a conv branch and a shortcut, and the module to gate a shortcut on."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from .capture import parameter_name, scope, scopes
from .layers import LayerCall, PrunableLayer
from .rules import VIEWS, NodeRule, Rule, op_name, shape_of

log = logging.getLogger(__name__)

# ATen op -> (index of the data input, index of the weight) of the layer calls recognised.
LAYER_OPS = {"linear": (0, 1), "conv1d": (0, 1), "conv2d": (0, 1), "conv_transpose2d": (0, 1), "addmm": (1, 2)}
CONV_OPS = {"conv1d", "conv2d", "conv_transpose2d"}
_WEIGHT_PATH = {"mul", "to", "_to_copy", "alias", "detach", "t", "transpose", "permute", "contiguous", "clone"}
_INPUT_PATH = VIEWS | {"pad", "constant_pad_nd", "contiguous", "clone", "_to_copy", "to"}


@dataclass
class ResidualJoin:
    """An addition of a conv branch (ending in ``branch``) and a shortcut path."""

    node: str
    layer: str
    branch: str
    shortcut: str
    gate_module: str | None


@dataclass
class LayerSite:
    """Nodes of one layer call: its output (after in-module reshapes), its input, and the
    nodes between them."""

    layer: str
    output: str
    input: str
    internal: list[str]


def _weight_source(node: fx.Node) -> str | None:
    """The qualified name of the parameter a layer op's weight comes from (through masking
    multiplications, casts and transposes)."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        name = parameter_name(current)
        if name is not None and (name.endswith(".weight") or name.endswith(".weight_orig")):
            return name
        if op_name(current) in _WEIGHT_PATH:
            frontier.extend(current.all_input_nodes)
    return None


def find_sites(graph: fx.Graph, layers: dict[str, PrunableLayer]) -> list[LayerSite]:
    """Every call of a layer of ``layers`` in the graph."""
    sites = []
    for node in graph.nodes:
        indices = LAYER_OPS.get(op_name(node) or "")
        if indices is None or len(node.args) <= indices[1] or not isinstance(node.args[indices[1]], fx.Node):
            continue
        source = _weight_source(node.args[indices[1]])
        layer = source.rsplit(".", 1)[0] if source else None
        if layer not in layers or (layers[layer].kind == "conv") != (op_name(node) in CONV_OPS):
            continue
        internal: list[str] = []
        data = node.args[indices[0]]
        while op_name(data) in _INPUT_PATH and scope(data) == layer and len(data.all_input_nodes) == 1:
            internal.append(data.name)
            data = data.all_input_nodes[0]
        output = node
        while len(output.users) == 1 and scope(next(iter(output.users))) == layer and op_name(next(iter(output.users))) in VIEWS:
            internal.append(output.name)
            output = next(iter(output.users))
        sites.append(LayerSite(layer, output.name, data.name, internal))
    return sites


def chain_end(rules: dict[str, NodeRule], nodes: dict[str, fx.Node], start: str) -> str:
    """The last node of the single-user PASS chain after ``start`` (post-activation)."""
    current = nodes[start]
    while len(current.users) == 1:
        user = next(iter(current.users))
        rule = rules.get(user.name)
        if rule is None or rule.rule is not Rule.PASS or rule.inputs != [current.name]:
            break
        current = user
    return current.name


def attach_calls(
    layers: dict[str, PrunableLayer], sites: list[LayerSite], rules: dict[str, NodeRule], graph: fx.Graph,
    batchnorms: dict[str, str],
) -> None:  # fmt: skip
    """Fill every layer's calls (and its BatchNorm) from the sites found and the rules."""
    nodes = {node.name: node for node in graph.nodes}
    found: dict[str, set[str | None]] = {}
    for site in sites:
        layer = layers[site.layer]
        structured = rules[site.output].rule is Rule.LAYER
        call = LayerCall(site.output, site.input, structured)
        if structured:
            call.chain_end = chain_end(rules, nodes, site.output)
        layer.calls.append(call)
        users = list(nodes[site.output].users)
        found.setdefault(site.layer, set()).add(batchnorms.get(users[0].name) if len(users) == 1 else None)
    for name, modules in found.items():
        layers[name].batchnorm = next(iter(modules)) if len(modules) == 1 else None


def _module_returning(node: fx.Node, consumer: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The submodule whose forward returns ``node`` (to hook a gate on), if unambiguous."""
    stack = scopes(node)
    if not stack or stack[-1] in scopes(consumer):
        return None
    return stack[-1] if stack[-1] in modules else None


def find_joins(
    layers: dict[str, PrunableLayer], rules: dict[str, NodeRule], graph: fx.Graph, modules: dict[str, nn.Module]
) -> tuple[list[ResidualJoin], dict[str, str]]:
    """Additions of exactly one conv branch and one shortcut path (the residual rule), and the
    shortcut nodes that can be gated (node -> module)."""
    nodes = {node.name: node for node in graph.nodes}
    branch_of = {
        call.chain_end: layer.name for layer in layers.values() if layer.kind == "conv" for call in layer.calls if call.chain_end
    }
    joins, gates = [], {}
    for node in graph.nodes:
        rule = rules[node.name]
        if rule.rule is not Rule.MERGE or op_name(node) not in ("add", "add_") or rule.product or len(rule.inputs) != 2:
            continue
        shape = shape_of(node)
        if shape is None or len(shape) not in (3, 4) or rule.axis != 1 or rule.uses or rule.inputs[0] == rule.inputs[1]:
            continue
        branches = [name for name in rule.inputs if name in branch_of]
        if len(branches) != 1:
            continue
        branch = branches[0]
        shortcut = rule.inputs[1] if rule.inputs[0] == branch else rule.inputs[0]
        gate = _module_returning(nodes[shortcut], node, modules) if len(nodes[shortcut].users) == 1 else None
        if gate is None:
            log.info("residual join %s: shortcut %s cannot be gated (not the sole output of a submodule)", node.name, shortcut)
        else:
            gates[shortcut] = gate
        joins.append(ResidualJoin(node.name, branch_of[branch], branch, shortcut, gate))
    return joins, gates
