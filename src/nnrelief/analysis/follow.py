"""Bring a capture up to date with the shortcut gates a pruning pass added, without
exporting the model again.

A shortcut gate multiplies a module's output by a buffer in a forward hook; a new capture of
the gated model would show exactly that multiplication, so it is written into the existing
capture instead (``torch.export`` costs several forward passes; this costs a walk over the
graph). Masks need nothing: they zero weights in place, which the capture reads as they are.
Anything else that changed is not followed: the caller captures again.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from ..pruning.masks import GATE, is_mask_buffer
from .capture import Capture, watch
from .nodes import INNER

ModuleState = dict[str, tuple[int, int, int]]  # module name -> (id, pre-hooks, forward hooks)


def module_state(model: nn.Module) -> ModuleState:
    """What :func:`follow_masks` compares to tell a followed change from any other."""
    return {name: (id(m), len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}


def follow_masks(captured: Capture, model: nn.Module, before: ModuleState, gate_nodes: dict[str, str]) -> bool:
    """Write the gates added to ``model`` since it was captured (its modules were then
    ``before``) into ``captured``, in place; ``gate_nodes`` maps a gateable module to the node
    it returns. False (and ``captured`` untouched) if anything else changed."""
    gated = _new_gates(captured, model, before, gate_nodes)
    if gated is None:
        return False
    graph = captured.graph
    for node in [node for node in graph.nodes if node.target is watch]:
        graph.erase_node(node)
    for module_name in gated:
        _gate_output(captured.module, gate_nodes[module_name], getattr(model.get_submodule(module_name), GATE))
    graph.lint()
    return True


def _new_gates(captured: Capture, model: nn.Module, before: ModuleState, gate_nodes: dict[str, str]) -> list[str] | None:
    """The modules newly gated, or None if the model changed in any other way (masks aside)."""
    held = {id(t): target for target, t in _held(captured.module).items()}
    nodes = {node.name: node for node in captured.graph.nodes}
    gated = []
    for name, module in model.named_modules():
        if name not in before or before[name][0] != id(module):
            return None
        prefix = f"{INNER}.{name}." if name else f"{INNER}."
        for tensor_name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            target = held.get(id(tensor))
            if target == prefix + tensor_name or is_mask_buffer(module, tensor_name):
                continue
            if tensor_name == GATE and target is not None:
                continue  # gated by an earlier pass, followed then
            if tensor_name == GATE and _gateable(nodes.get(gate_nodes.get(name, "")), tensor):
                gated.append(name)
            else:
                return None
        hooks = (len(module._forward_pre_hooks) - before[name][1], len(module._forward_hooks) - before[name][2])
        if hooks != (0, int(name in gated)):
            return None
    if len(before) != sum(1 for _ in model.named_modules()):
        return None
    return gated


def _gateable(node: fx.Node | None, gate: Tensor) -> bool:
    value = None if node is None else node.meta.get("val")
    return isinstance(value, Tensor) and value.dim() >= 2 and value.dtype == gate.dtype and value.shape[1] == gate.numel()


def _held(module: fx.GraphModule) -> dict[str, Tensor]:
    """The model tensors the capture reads, by get_attr target."""
    return {node.target: _attribute(module, node.target) for node in module.graph.nodes if node.op == "get_attr"}


def _attribute(module: nn.Module, target: str) -> Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _gate_output(gm: fx.GraphModule, node_name: str, gate: Tensor) -> None:
    """The users of node ``node_name`` read it times ``gate`` (per channel, dim 1), as the gate
    hook computes it."""
    graph = gm.graph
    node = next(n for n in graph.nodes if n.name == node_name)
    value = node.meta["val"]
    attr = f"_nnrelief_gate_{node_name}"
    gm.register_buffer(attr, gate)
    shape = [1, -1] + [1] * (value.dim() - 2)
    first = next(n for n in graph.nodes if n.op != "get_attr")
    with graph.inserting_before(first):
        gate_node = graph.get_attr(attr)
    gate_node.meta = {"val": torch.empty(gate.shape, dtype=gate.dtype, device="meta")}
    with graph.inserting_after(node):
        view = graph.call_function(torch.ops.aten.view.default, (gate_node, shape))
    with graph.inserting_after(view):
        product = graph.call_function(torch.ops.aten.mul.Tensor, (node, view))
    stack = node.meta.get("nn_module_stack", {})
    view.meta = {"val": torch.empty([1, gate.numel()] + shape[2:], dtype=gate.dtype, device="meta"), "nn_module_stack": stack}
    product.meta = {"val": value, "nn_module_stack": stack}
    node.replace_all_uses_with(product, delete_user_cb=lambda user: user is not product)
