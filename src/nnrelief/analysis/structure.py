"""Where the layers run in a captured graph, and the structure around them: the channel-wise
chain after each call (its post-activation output), the BatchNorm reading it, residual
joins of a conv branch and a shortcut, and the module to gate a shortcut on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..kinds import layer_ops
from .layers import LayerCall, PrunableLayer
from .nodes import op_name, parameter_name, scope, scopes, shape_of
from .rules import VIEWS, NodeRule, Rule

log = logging.getLogger(__name__)

# ATen op -> (index of the data input, index of the weight, layer family) of the layer calls recognised.
LAYER_OPS = layer_ops()
_CASTS = {"to", "_to_copy", "alias", "detach", "contiguous", "clone"}
_WEIGHT_PATH = _CASTS | {"t", "transpose", "permute"}
_INPUT_PATH = VIEWS | {"pad", "constant_pad_nd", "contiguous", "clone", "_to_copy", "to"}
# A Linear written out as ``x @ self.weight.T (+ self.bias)`` (Falcon, hand-written layers).
_MATMULS = {"matmul", "mm"}


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
        if name is not None and name.endswith(".weight"):
            return name
        if op_name(current) in _WEIGHT_PATH:
            frontier.extend(current.all_input_nodes)
    return None


def find_sites(graph: fx.Graph, layers: dict[str, PrunableLayer]) -> list[LayerSite]:
    """Every call of a layer of ``layers`` in the graph."""
    sites = []
    for node in graph.nodes:
        site = _layer_op_site(node, layers) or _matmul_site(node, layers)
        if site is not None:
            sites.append(site)
    return sites


def _layer_op_site(node: fx.Node, layers: dict[str, PrunableLayer]) -> LayerSite | None:
    """A call of a layer op (:data:`LAYER_OPS`) on a layer's weight."""
    data, weight, family = LAYER_OPS.get(op_name(node) or "", (None, None, None))
    if family is None or len(node.args) <= weight or not isinstance(node.args[weight], fx.Node):
        return None
    source = _weight_source(node.args[weight])
    layer = source.rsplit(".", 1)[0] if source else None
    if layer not in layers or layers[layer].kind != family:
        return None
    return _site(layer, node, node.args[data], [])


def _matmul_site(node: fx.Node, layers: dict[str, PrunableLayer]) -> LayerSite | None:
    """``x @ weight.T``, then ``+ bias`` where the layer has one, all inside a Linear module
    of ``layers``; not recognised (the layer is then not scored) when the bias is added
    elsewhere or the weight is not used transposed exactly once."""
    if op_name(node) not in _MATMULS or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    found = _parameter_path(node.args[1], "weight")
    layer = found[0].rsplit(".", 1)[0] if found else None
    if found is None or found[1] != 1 or layer not in layers or layers[layer].kind != "linear" or scope(node) != layer:
        return None
    if layers[layer].transposed:
        return None
    if getattr(layers[layer].module, "bias", None) is None:
        return _site(layer, node, node.args[0], [])
    product, internal = _views_after(node, layer)  # (x.reshape(-1, in) @ weight.T).reshape(..., out) + bias
    users = list(product.users)
    add = users[0] if len(users) == 1 else None
    if add is None or op_name(add) != "add" or scope(add) != layer or len(add.args) != 2 or add.args[0] is not product:
        return None
    bias = _parameter_path(add.args[1], "bias") if isinstance(add.args[1], fx.Node) else None
    if bias != (f"{layer}.bias", 0):
        return None
    return _site(layer, add, node.args[0], [*internal, product.name])


def _site(layer: str, output: fx.Node, data: Any, internal: list[str]) -> LayerSite:
    """The site of a call of ``layer`` computing ``output`` from ``data``: in-module reshapes
    of the input and of the output become internal nodes."""
    while op_name(data) in _INPUT_PATH and scope(data) == layer and len(data.all_input_nodes) == 1:
        internal.append(data.name)
        data = data.all_input_nodes[0]
    output, reshapes = _views_after(output, layer)
    return LayerSite(layer, output.name, data.name, internal + reshapes)


def _views_after(node: fx.Node, layer: str) -> tuple[fx.Node, list[str]]:
    """The end of the chain of single-user reshapes of ``node`` inside ``layer``, and the
    names of the nodes before it."""
    passed = []
    while len(node.users) == 1 and scope(next(iter(node.users))) == layer and op_name(next(iter(node.users))) in VIEWS:
        passed.append(node.name)
        node = next(iter(node.users))
    return node, passed


def _parameter_path(node: fx.Node, kind: str) -> tuple[str, int] | None:
    """(the layer parameter ``<layer>.<kind>`` that ``node`` is, through
    casts and 2-D transposes; how many times it was transposed, mod 2), or None."""
    name = parameter_name(node)
    if name is not None:
        return (name, 0) if name.endswith(f".{kind}") else None
    operation = op_name(node)
    inputs = node.all_input_nodes
    if operation in ("t", "numpy_T") or (operation in ("transpose", "permute") and _swaps_2d(node)):
        found = _parameter_path(inputs[0], kind) if len(inputs) == 1 else None
        return None if found is None else (found[0], 1 - found[1])
    if operation in _CASTS and len(inputs) == 1:
        return _parameter_path(inputs[0], kind)
    return None


def _swaps_2d(node: fx.Node) -> bool:
    """Whether a transpose/permute of a 2-D tensor swaps its two dims."""
    dims = [d % 2 for d in (node.args[1:3] if op_name(node) == "transpose" else node.args[1])]
    return dims == [1, 0] if op_name(node) == "permute" else len(dims) == 2 and dims[0] != dims[1]


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
