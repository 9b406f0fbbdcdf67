"""One channel graph per model: which layers NNrelief scores, where they run, and how their
channels couple, from one ``torch.export`` capture.

:func:`analyse` captures the model once per module structure and input signature (cached:
every later pass, and ``compact``, reuse it; changing the modules, their parameters or hooks
captures again) and derives:

* the layers (Linear, GPT-2 ``Conv1D``, Conv2d) and each of their calls (a shared module
  has several), with the node each call reads and the post-activation node after it;
* a :class:`~nnrelief.analysis.rules.NodeRule` per node: how its channels relate to its
  inputs' channels, with the channel axis tracked through reshapes and permutes (so a
  Linear on (batch, tokens, features) and channels-last blocks are understood), gated
  products (``down(act(gate(x)) * up(x))``) coupling their factors, concatenations,
  paddings and residual additions;
* residual joins of a conv branch and a shortcut, and the modules to gate shortcuts on.

A model that cannot be exported (data-dependent control flow) gets a graph without rules:
its layers are found by running the model with hooks and pruned at connection level only
(:attr:`ChannelGraph.reason` says why).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from torch import Tensor

from ..inputs import ModelInput
from ..pruning.masks import is_mask_buffer
from .capture import Capture, capture, observing
from .derive import RuleDeriver
from .follow import ModuleState, follow_masks, module_state
from .layers import LayerCall, PrunableLayer, find_layers, is_transposed_linear, prunable_kind, weight_matrix
from .nodes import parameter_name, scope
from .rules import NodeRule, Rule, map_axis
from .structure import ResidualJoin, attach_calls, find_joins, find_sites

__all__ = [
    "ChannelGraph", "LayerCall", "NodeRule", "PrunableLayer", "ResidualJoin", "Rule", "activity_key", "analyse", "graph_for",
    "map_axis", "one_signature", "refresh",
    "input_key", "is_transposed_linear", "map_key", "observing", "prunable_kind", "weight_matrix",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class ChannelGraph:
    """Prunable layers of a model and, when captured, the channel rules between them."""

    layers: dict[str, PrunableLayer]
    skipped: dict[str, str]
    capture: Capture | None = None
    rules: dict[str, NodeRule] = field(default_factory=dict)
    joins: list[ResidualJoin] = field(default_factory=list)
    batchnorms: dict[str, str] = field(default_factory=dict)  # node -> BatchNorm module
    gates: dict[str, str] = field(default_factory=dict)  # shortcut node -> module to gate
    reason: str | None = None  # why there is no capture
    signature: tuple = ()  # of the inputs it was captured for
    modules: ModuleState = field(default_factory=dict)  # the model's modules when captured

    @property
    def traced(self) -> bool:
        """Whether channel rules are available (structure cleaning possible)."""
        return self.capture is not None


def input_key(layer: str) -> str:
    """Statistics key of a layer's input."""
    return f"input:{layer}"


def activity_key(layer: str) -> str:
    """Statistics key of a layer's post-activation output."""
    return f"activity:{layer}"


def map_key(node: str) -> str:
    """Statistics key of a node's |x| map (residual joins)."""
    return f"map:{node}"


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[tuple, ChannelGraph]]] = weakref.WeakKeyDictionary()
_TOLD: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose analysis was logged at INFO


def analyse(model: nn.Module, example: ModelInput, dynamic: bool = True) -> ChannelGraph:
    """The channel graph of ``model`` for inputs like ``example`` (cached, see the module
    docstring). The model should be in eval mode, as the pass runs it. ``dynamic=False``
    captures for ``example``'s exact shapes (cheaper: for inputs that all have them)."""
    fingerprint = _fingerprint(model)
    stored = _CACHE.get(model)
    if stored is None or stored[0] != fingerprint:
        stored = (fingerprint, {})
        _CACHE[model] = stored
    graphs = stored[1]
    for key in (_signature(example, dynamic=True), _signature(example, dynamic=False)):
        if key in graphs:
            return graphs[key]
    graph = _build(model, example, dynamic)
    dynamic = graph.capture is not None and graph.capture.dynamic_batch
    graph.signature = _signature(example, dynamic=dynamic)
    graphs[graph.signature] = graph
    _tell_how(model, graph)
    return graph


def _tell_how(model: nn.Module, graph: ChannelGraph) -> None:
    """One INFO line per model on how it was analysed (DEBUG for its later captures)."""
    if graph.traced:
        how = (f"channel graph from torch.export: {len(graph.layers)} prunable layers, {len(graph.joins)} residual joins, "
               "structure cleaning on")  # fmt: skip
    else:
        how = f"{graph.reason}: pruning at connection level, no structure cleaning"
    first = model not in _TOLD
    _TOLD.add(model)
    log.log(logging.INFO if first else logging.DEBUG, "%s analysed: %s", type(model).__name__, how)


def one_signature(examples: Iterable[ModelInput]) -> bool:
    """Whether all ``examples`` have the same input signature, shapes included (one
    capture for exactly those shapes serves them all)."""
    signatures = {_signature(example, dynamic=False) for example in examples}
    return len(signatures) == 1


def graph_for(model: nn.Module, example: ModelInput, graph: ChannelGraph) -> ChannelGraph:
    """``graph`` if ``example`` has its input signature, else the graph for ``example``'s."""
    if _signature(example, dynamic=graph.signature[:1] == (True,)) == graph.signature:
        return graph
    return analyse(model, example)


def _fingerprint(model: nn.Module) -> tuple:
    """Changes when modules, parameters, buffers or hooks are added, removed or replaced."""
    parts: list[Any] = []
    for name, module in model.named_modules():
        parts.append((name, id(module), len(module._forward_pre_hooks), len(module._forward_hooks), module.training))
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and not is_mask_buffer(module, name):  # masks change weights' values, not the graph
                parts.append((f"{prefix}.{name}", id(tensor), tuple(tensor.shape), tensor.dtype, tensor.device))
    return tuple(parts)


def _signature(example: ModelInput, dynamic: bool) -> tuple:
    def describe(value: Any) -> Any:
        if isinstance(value, Tensor):
            shape = tuple(value.shape[1:]) if dynamic and value.dim() > 0 else tuple(value.shape)
            return ("tensor", shape, value.dtype, value.device)
        return ("value", repr(value)[:200])

    return (dynamic, tuple(describe(v) for v in example.args), tuple((k, describe(v)) for k, v in example.kwargs.items()))


def refresh(model: nn.Module, example: ModelInput, graph: ChannelGraph) -> ChannelGraph:
    """The graph of ``model`` after a pass (``graph`` is its graph before): masks change no
    module, so the capture stays; new shortcut gates are followed in place where they can be
    (no new export), else the model is captured again. Either way the next :func:`analyse`
    finds it."""
    stored = _CACHE.get(model)
    fingerprint = _fingerprint(model)
    if stored is not None and stored[0] == fingerprint:
        return graph
    captured = graph.capture
    if captured is not None and graph.modules and graph.signature:
        gate_nodes = {module: node for node, module in graph.gates.items()}
        try:
            followed = follow_masks(captured, model, graph.modules, gate_nodes)
        except Exception as error:  # noqa: BLE001 - a capture half followed is dropped: captured again
            log.debug("could not follow the new gates in the capture (%s: %s); capturing again", type(error).__name__, error)
            followed = False
        if followed:
            layers, skipped = find_layers(model)
            new = _derive(model, captured, layers, skipped)
            new.signature = graph.signature
            _CACHE[model] = (fingerprint, {new.signature: new})
            return new
    _CACHE.pop(model, None)
    return analyse(model, example)


def _build(model: nn.Module, example: ModelInput, dynamic: bool) -> ChannelGraph:
    layers, skipped = find_layers(model)
    try:
        captured = capture(model, example, dynamic)
    except Exception as error:  # noqa: BLE001 - any export failure means "no channel graph"
        reason = f"torch.export could not capture {type(model).__name__} ({type(error).__name__}: {_first_line(error)})"
        return ChannelGraph(layers, skipped, reason=reason)
    return _derive(model, captured, layers, skipped)


def _derive(model: nn.Module, captured: Capture, layers: dict[str, PrunableLayer], skipped: dict[str, str]) -> ChannelGraph:
    """The channel graph from a capture of ``model`` (watch points added to it)."""
    modules = dict(model.named_modules())
    sites = find_sites(captured.graph, layers)
    layer_of = {site.output: (site.layer, site.input, layers[site.layer].kind) for site in sites}
    internal = {name for site in sites for name in site.internal}
    deriver = RuleDeriver(layer_of, internal, lambda node: _batchnorm_affine(node, modules))
    rules = deriver.run(captured.graph)
    nodes = {node.name: node for node in captured.graph.nodes}
    batchnorms = {name: scope(nodes[name]) for name in deriver.batchnorms}
    attach_calls(layers, sites, rules, captured.graph, batchnorms)
    read = {parameter_name(node) for node in captured.graph.nodes if node.op == "get_attr" and node.users}
    for name in [name for name, layer in layers.items() if not layer.calls]:
        if f"{name}.weight" in read:
            skipped[name] = ("its weight is read by operations that are not a plain call of the layer "
                             "(e.g. x @ weight, or its bias added after other operations): left whole")  # fmt: skip
        else:
            skipped[name] = "never runs in the forward pass (an unused head, or its weight read by other code)"
        del layers[name]
    joins, gates = find_joins(layers, rules, captured.graph, modules)
    graph = ChannelGraph(layers, skipped, captured, rules, joins, batchnorms, gates, modules=module_state(model))
    captured.add_watch_points(_watch_points(graph))
    log.debug("channel graph of %s: %d nodes, %d layers, %d residual joins", type(model).__name__, len(nodes), len(layers), len(joins))
    return graph


def _watch_points(graph: ChannelGraph) -> dict[str, list[str]]:
    points: dict[str, list[str]] = {}
    for layer in graph.layers.values():
        points[input_key(layer.name)] = [call.input_node for call in layer.calls]
        ends = [call.chain_end for call in layer.calls if call.chain_end is not None]
        if ends and layer.structured:
            points[activity_key(layer.name)] = ends
    for join in graph.joins:
        for node in (join.branch, join.shortcut):
            points.setdefault(map_key(node), [node])
    return points


def _batchnorm_affine(node: Any, modules: dict[str, nn.Module]) -> bool | None:
    module = modules.get(scope(node) or "")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.affine
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
