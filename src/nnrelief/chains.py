"""Linear -> elementwise -> Linear chains in models that ``torch.fx`` cannot trace.

Hugging Face transformers (5.x) do not trace with ``torch.fx.symbolic_trace``; their own fx
tracer is gone. ``torch.export`` captures them as an ATen graph whose nodes carry the module
they ran in (``nn_module_stack``). From it this module finds, for every Linear-like layer P
(``nn.Linear`` or a transposed ``Conv1D`` as in GPT-2), whether its outputs reach exactly
one other layer C through elementwise operations only (activations, dropout, scalings,
sums of such terms): a transformer's FFN ``intermediate -> act -> output``. Then output
neuron k of P feeds only input k of C, and structure cleaning can remove whole
intermediate neurons. Everything else (attention, residual stream, LayerNorm, embeddings)
stays at connection level: it is never made narrower.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from .inputs import ModelInput

log = logging.getLogger(__name__)

_INNER = "inner"
# ATen ops (by packet name) that act elementwise and map a zero to a zero.
_ZERO_PRESERVING = {
    "gelu", "relu", "relu6", "silu", "tanh", "dropout", "clone", "neg", "hardtanh", "leaky_relu",
    "mish", "hardswish", "elu", "celu", "selu", "alias", "contiguous", "_to_copy", "to", "detach",
    "sin", "abs", "sign", "tan", "asin", "atan", "sinh", "asinh", "atanh", "erf",
}  # fmt: skip
# Elementwise ops with a nonzero response to zero.
_CONSTANT_MAKING = {"sigmoid", "exp", "softplus", "cos", "cosh", "hardsigmoid", "erfc", "log_sigmoid"}
_ARITHMETIC = {"add", "sub", "mul", "div", "pow", "rsub"}


@dataclass
class LayerChain:
    """Output neuron k of ``producer`` feeds input k of ``consumer`` and nothing else.

    ``zero_preserving``: a neuron without incoming connections and bias gives a zero
    consumer input (the elementwise path maps 0 to 0), so its consumer inputs can go too.
    """

    producer: str
    consumer: str
    zero_preserving: bool


class _TensorOutputs(nn.Module):
    """Calls the model and returns only the tensors of its output (drops caches etc.)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, _INNER, model)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        output = getattr(self, _INNER)(*args, **kwargs)
        if isinstance(output, dict):
            output = list(output.values())
        elif not isinstance(output, (tuple, list)):
            output = [output]
        return tuple(value for value in output if isinstance(value, Tensor))


def _scope(node: fx.Node) -> str | None:
    """Qualified name (in the user's model) of the innermost module ``node`` ran in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len(_INNER) + 1 :] if path.startswith(_INNER + ".") else None


def _shape(node: Any) -> torch.Size | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.shape if isinstance(value, Tensor) else None


def _op_name(node: fx.Node) -> str | None:
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", None) if node.op == "call_function" else None


def _elementwise_zero(node: fx.Node, zero: dict[str, bool]) -> bool | None:
    """Whether an elementwise ``node`` maps zero inputs from the region to zero; None if the
    node is not elementwise in a way the chain analysis understands."""
    name = _op_name(node)
    region = [arg for arg in node.args if isinstance(arg, fx.Node)]
    if any(arg.name not in zero for arg in region) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    scalars = [arg for arg in node.args if isinstance(arg, (int, float))]
    if name in _ZERO_PRESERVING:
        return zero[region[0].name] if len(region) == 1 else None
    if name in _CONSTANT_MAKING:
        return False if len(region) == 1 else None
    if name not in _ARITHMETIC:
        return None
    zeros = [zero[arg.name] for arg in region]
    if name == "mul":
        return any(zeros)
    if name == "div":
        return isinstance(node.args[0], fx.Node) and zero[node.args[0].name]
    if name == "pow":
        return len(region) == 1 and node.args[0] is region[0] and all(s > 0 for s in scalars) and zeros[0]
    return all(zeros) and all(s == 0 for s in scalars)  # add, sub, rsub


def _layer_nodes(graph: fx.Graph, names: Iterable[str], user_inputs: set[str]) -> tuple[dict[str, fx.Node], dict[str, fx.Node]]:
    """Per layer, its output node (the one node of its scope used outside it) and the one
    tensor from outside its scope it reads (parameters and buffers aside)."""
    names = set(names)
    outputs: dict[str, list[fx.Node]] = {}
    inputs: dict[str, set[str]] = {}
    nodes = {node.name: node for node in graph.nodes}
    for node in graph.nodes:
        scope = _scope(node)
        if scope not in names:
            continue
        if any(_scope(user) != scope for user in node.users):
            outputs.setdefault(scope, []).append(node)
        for arg in node.all_input_nodes:
            if _scope(arg) != scope and (arg.op != "placeholder" or arg.name in user_inputs):
                inputs.setdefault(scope, set()).add(arg.name)
    single_out = {name: found[0] for name, found in outputs.items() if len(found) == 1}
    single_in = {name: nodes[next(iter(found))] for name, found in inputs.items() if len(found) == 1}
    return single_out, single_in


def _chain_from(producer: str, start: fx.Node, layer_inputs: dict[str, fx.Node], graph: fx.Graph) -> LayerChain | None:
    """Follow ``start`` (the producer's output) through elementwise nodes to one consumer."""
    shape = _shape(start)
    zero = {start.name: True}
    consumers: set[tuple[str, str]] = set()
    order = list(graph.nodes)
    for node in order[order.index(start) + 1 :]:
        if not any(arg.name in zero for arg in node.all_input_nodes):
            continue
        scope = _scope(node)
        if scope in layer_inputs and scope != producer:
            feed = layer_inputs[scope]
            if feed.name not in zero:
                return None
            consumers.add((scope, feed.name))
            continue
        result = _elementwise_zero(node, zero) if node.op == "call_function" and _shape(node) == shape else None
        if result is None:
            return None
        zero[node.name] = result
    if len(consumers) != 1:
        return None
    consumer, feed = next(iter(consumers))
    if _shape(layer_inputs[consumer]) != shape:
        return None
    return LayerChain(producer, consumer, zero[feed])


def find_chains(model: nn.Module, example: ModelInput, features: dict[str, tuple[int, int]]) -> list[LayerChain]:
    """Producer -> consumer chains among the Linear-like layers ``features`` (name ->
    (in_features, out_features)), from a ``torch.export`` capture of ``model`` on ``example``.

    Returns [] with a warning when the model cannot be exported.
    """
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Masked layers set their .weight in a pre-hook; export warns about the attribute
            # assignment. Harmless here: the capture is only read, never run.
            warnings.simplefilter("ignore", UserWarning)
            program = torch.export.export(_TensorOutputs(model), example.args, example.kwargs, strict=False)
    except Exception as error:  # noqa: BLE001 - any export failure means "no chains"
        log.warning(
            "torch.export could not capture %s either (%s: %s); no structure cleaning",
            type(model).__name__, type(error).__name__, str(error).splitlines()[0] if str(error) else "",
        )
        return []
    graph = program.graph_module.graph
    outputs, inputs = _layer_nodes(graph, features, set(program.graph_signature.user_inputs))
    chains = []
    for producer, start in outputs.items():
        shape = _shape(start)
        if shape is None or len(shape) < 2 or shape[-1] != features[producer][1]:
            continue
        chain = _chain_from(producer, start, inputs, graph)
        if chain is not None and features[chain.consumer][0] == shape[-1]:
            chains.append(chain)
    log.info("torch.export capture: %d layer chains (e.g. FFN intermediate neurons) can be cleaned", len(chains))
    return chains
