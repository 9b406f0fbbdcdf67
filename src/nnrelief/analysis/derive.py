"""The :class:`~nnrelief.analysis.rules.NodeRule` of every node of a captured ATen graph."""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx

from .nodes import op_name, shape_of
from .rules import (
    ADDITIVE,
    BATCHNORMS,
    CONSTANT_MAKING,
    DIVISIONS,
    POOLING,
    PRODUCTS,
    REDUCTIONS,
    SHAPE_ONLY,
    VIEWS,
    ZERO_PRESERVING,
    NodeRule,
    Rule,
    map_axis,
    normalise_dim,
)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in node.all_input_nodes if shape_of(arg) is not None]


class RuleDeriver:
    """Walks the graph in order, deriving each node's rule from its inputs' rules.

    ``layer_of`` maps the output node of a layer call to (layer name, input node, kind:
    'linear' or 'conv'); ``internal`` are the other nodes of layer calls (reshapes inside a
    Conv1D, a conv's own padding); ``batchnorm_affine`` tells, for a batch-norm node,
    whether its module is affine (None: not a BatchNorm module)."""

    def __init__(
        self,
        layer_of: dict[str, tuple[str, str, str]],
        internal: set[str],
        batchnorm_affine: Callable[[fx.Node], bool | None],
    ) -> None:
        self.layer_of = layer_of
        self.internal = internal
        self.batchnorm_affine = batchnorm_affine
        self.rules: dict[str, NodeRule] = {}
        self.batchnorms: set[str] = set()

    def run(self, graph: fx.Graph) -> dict[str, NodeRule]:
        self.nodes = {node.name: node for node in graph.nodes}
        for node in graph.nodes:
            self.rules[node.name] = self._rule(node)
        return self.rules

    # -- helpers

    def _axis(self, node: Any) -> int | None:
        rule = self.rules.get(node.name) if isinstance(node, fx.Node) else None
        return None if rule is None or rule.channels is None else rule.axis

    def _opaque(self, node: fx.Node) -> NodeRule:
        return NodeRule(Rule.OPAQUE, [arg.name for arg in _tensor_args(node)], None)

    def _with_axis(self, rule: Rule, node: fx.Node, inputs: list[str], axis: int, **extra: Any) -> NodeRule:
        shape = shape_of(node)
        channels = shape[axis] if shape is not None and axis < len(shape) else None
        if channels is None:
            return self._opaque(node)
        return NodeRule(rule, inputs, channels, axis=axis, **extra)

    # -- dispatch

    def _rule(self, node: fx.Node) -> NodeRule:
        if node.op == "output":
            return NodeRule(Rule.OUTPUT, [arg.name for arg in _tensor_args(node)], None)
        if node.op in ("placeholder", "get_attr"):
            return NodeRule(Rule.INPUT, [], None)
        name = op_name(node)
        if node.name in self.layer_of:
            return self._layer(node, *self.layer_of[node.name])
        if node.name in self.internal:
            return NodeRule(Rule.IGNORE, [], None)
        if name == "getitem":
            return self._getitem(node)
        if shape_of(node) is None:
            ignorable = name in SHAPE_ONLY or node.op != "call_function"
            return NodeRule(Rule.IGNORE, [], None) if ignorable else self._opaque(node)
        source = node.args[0] if node.args else None
        axis = self._axis(source)
        if axis is None and name not in ADDITIVE | PRODUCTS | DIVISIONS | {"cat"}:
            return self._opaque(node)
        return self._known(node, name, source, axis)

    def _known(self, node: fx.Node, name: str | None, source: Any, axis: int | None) -> NodeRule:
        if name in ZERO_PRESERVING or name in CONSTANT_MAKING:
            return self._elementwise(node, source, axis, zero_preserving=name in ZERO_PRESERVING)
        if name == "pow" and len(node.args) > 1 and isinstance(node.args[1], (int, float)):
            return self._elementwise(node, source, axis, zero_preserving=node.args[1] > 0)
        if name in BATCHNORMS:
            return self._batchnorm(node, source, axis)
        if name in POOLING:
            return self._pool(node, source, axis)
        if name in REDUCTIONS:
            return self._reduction(node, source, axis)
        if name in VIEWS:
            return self._reshape(node, source, axis)
        if name in ("permute", "transpose", "t", "transpose_"):
            return self._permute(node, name, source, axis)
        if name in ("slice", "select"):
            return self._index(node, name, source, axis)
        if name in ("pad", "constant_pad_nd"):
            return self._pad(node, name, source, axis)
        if name in ADDITIVE or name in PRODUCTS or name in DIVISIONS:
            return self._merge(node, name)
        if name == "cat":
            return self._cat(node)
        return self._opaque(node)

    # -- rules

    def _layer(self, node: fx.Node, layer: str, source: str, kind: str) -> NodeRule:
        """A layer call; opaque where its input's channel axis is not the one it reads (a
        Linear over the tokens of a (B, C, T) map) or a conv's input is unbatched."""
        shape, out = shape_of(self.nodes[source]), shape_of(node)
        rule = self.rules.get(source)
        reads = None if shape is None else len(shape) - 1 if kind == "linear" else 1
        understood = shape is not None and out is not None and (kind == "linear" or len(shape) >= 3)
        if not understood or (rule is not None and rule.channels is not None and rule.axis != reads):
            return NodeRule(Rule.OPAQUE, [source], None)
        return self._with_axis(Rule.LAYER, node, [source], len(out) - 1 if kind == "linear" else 1, layer=layer)

    def _elementwise(self, node: fx.Node, source: fx.Node, axis: int, zero_preserving: bool) -> NodeRule:
        if len(_tensor_args(node)) != 1 or shape_of(node) != shape_of(source):
            return self._opaque(node)
        return self._with_axis(Rule.PASS, node, [source.name], axis, zero_preserving=zero_preserving)

    def _getitem(self, node: fx.Node) -> NodeRule:
        producer, index = node.args[0], node.args[1]
        rule = self.rules.get(producer.name) if isinstance(producer, fx.Node) else None
        if rule is None or index != 0 or rule.rule is not Rule.PASS or shape_of(node) is None:
            return self._opaque(node) if shape_of(node) is not None else NodeRule(Rule.IGNORE, [], None)
        return self._with_axis(Rule.PASS, node, [producer.name], rule.axis)

    def _tuple_source_rule(self, node: fx.Node, source: fx.Node, axis: int, zero_preserving: bool) -> NodeRule:
        """A PASS rule for ops that may return a tuple whose first element is the result."""
        value = node.meta.get("val")
        shape = shape_of(node) if not isinstance(value, (tuple, list)) else None
        if isinstance(value, (tuple, list)):
            first = value[0]
            shape = tuple(s if isinstance(s, int) else None for s in first.shape)
        in_shape = shape_of(source)
        if shape is None or in_shape is None or axis != 1 or len(shape) != len(in_shape) or shape[1] != in_shape[1]:
            return self._opaque(node)
        return NodeRule(Rule.PASS, [source.name], shape[1], zero_preserving=zero_preserving, axis=1)

    def _batchnorm(self, node: fx.Node, source: fx.Node, axis: int) -> NodeRule:
        affine = self.batchnorm_affine(node)
        if affine is None:
            return self._opaque(node)
        rule = self._tuple_source_rule(node, source, axis, zero_preserving=affine)
        if rule.rule is Rule.PASS and affine:
            self.batchnorms.add(node.name)
        return rule

    def _pool(self, node: fx.Node, source: fx.Node, axis: int) -> NodeRule:
        return self._tuple_source_rule(node, source, axis, zero_preserving=True)

    def _reduction(self, node: fx.Node, source: fx.Node, axis: int) -> NodeRule:
        in_shape = shape_of(source)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or in_shape is None:
            return self._opaque(node)
        dims = [normalise_dim(d, len(in_shape)) for d in ([dims] if isinstance(dims, int) else dims)]
        if axis in dims:
            return self._opaque(node)
        new_axis = axis if keepdim else axis - sum(d < axis for d in dims)
        return self._with_axis(Rule.PASS, node, [source.name], new_axis)

    def _reshape(self, node: fx.Node, source: fx.Node, axis: int) -> NodeRule:
        before, after = shape_of(source), shape_of(node)
        mapped = map_axis(before, axis, after) if before is not None and after is not None else None
        if mapped is None:
            return self._opaque(node)
        new_axis, outer, spatial = mapped
        if outer == 1 and spatial == 1:
            return self._with_axis(Rule.PASS, node, [source.name], new_axis)
        return self._with_axis(Rule.FLATTEN, node, [source.name], new_axis, outer=outer, spatial=spatial)

    def _permute(self, node: fx.Node, name: str, source: fx.Node, axis: int) -> NodeRule:
        ndim = len(shape_of(source))
        if name == "permute":
            order = [normalise_dim(d, ndim) for d in node.args[1]]
            new_axis = order.index(axis)
        else:
            first, second = (0, 1) if name == "t" else (normalise_dim(node.args[1], ndim), normalise_dim(node.args[2], ndim))
            new_axis = second if axis == first else first if axis == second else axis
        return self._with_axis(Rule.PASS, node, [source.name], new_axis)

    def _index(self, node: fx.Node, name: str, source: fx.Node, axis: int) -> NodeRule:
        ndim = len(shape_of(source))
        dim = normalise_dim(node.args[1] if len(node.args) > 1 else 0, ndim)
        if dim == axis:
            return self._opaque(node)
        new_axis = axis - 1 if name == "select" and dim < axis else axis
        return self._with_axis(Rule.PASS, node, [source.name], new_axis)

    def _pad(self, node: fx.Node, name: str, source: fx.Node, axis: int) -> NodeRule:
        pad = list(node.args[1])
        if name == "pad":  # aten.pad(input, pad, mode="constant", value=None)
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        else:  # aten.constant_pad_nd(input, pad, value=0)
            mode, value = "constant", node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        ndim = len(shape_of(source))
        pair = ndim - 1 - axis  # pad pairs run from the last dim backwards
        front, back = (pad[2 * pair], pad[2 * pair + 1]) if len(pad) > 2 * pair else (0, 0)
        if front == back == 0:
            zero = mode != "constant" or value in (None, 0, 0.0)
            return self._with_axis(Rule.PASS, node, [source.name], axis, zero_preserving=zero)
        if mode != "constant" or value not in (None, 0, 0.0) or front < 0 or back < 0:
            return self._opaque(node)
        return self._with_axis(Rule.PAD, node, [source.name], axis, pad=(front, back))

    def _merge(self, node: fx.Node, name: str) -> NodeRule:
        """Elementwise op: operands with the output's channel axis merge; operands broadcast
        along it are read as a whole; a nonzero constant term is not zero-preserving."""
        out = shape_of(node)
        operands = [*node.args[:2], node.kwargs.get("other")]
        axes = {self._axis(arg) - len(shape_of(arg)) for arg in operands if isinstance(arg, fx.Node) and self._axis(arg) is not None}
        if len(axes) != 1 or out is None:
            return self._opaque(node)
        axis = len(out) + axes.pop()
        merged, uses, constant = [], [], False
        for arg in operands:
            if isinstance(arg, fx.Node) and shape_of(arg) is not None:
                shape = shape_of(arg)
                position = axis - (len(out) - len(shape))
                if position >= 0 and shape[position] == out[axis] and self._axis(arg) in (position, None):
                    merged.append(arg.name)
                else:
                    uses.append(arg.name)
                    constant = True
            elif isinstance(arg, (int, float)):
                constant |= arg != 0
            elif arg is not None:
                constant = True
        if name in DIVISIONS and node.args[0] is not None and getattr(node.args[0], "name", None) not in merged:
            return self._opaque(node)
        product = name in PRODUCTS
        zero_preserving = product or name in DIVISIONS or not constant
        return self._with_axis(Rule.MERGE, node, merged, axis, zero_preserving=zero_preserving, product=product, uses=uses)

    def _cat(self, node: fx.Node) -> NodeRule:
        parts = node.args[0]
        out = shape_of(node)
        dim = normalise_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(out))
        axes = {self._axis(part) for part in parts}
        if len(axes) != 1 or None in axes:
            return self._opaque(node)
        axis = axes.pop()
        if dim == axis:
            return self._with_axis(Rule.CAT, node, [part.name for part in parts], axis)
        return self._with_axis(Rule.MERGE, node, [part.name for part in parts], axis)
