"""Small questions asked of one node of a captured graph: which ATen op it calls, its shape,
which of the user's modules it ran in, which parameter it reads. Shared by the channel
graph (:mod:`.derive`, :mod:`.structure`) and by compaction (narrowing, index maps)."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import Tensor

INNER = "inner"  # the model's attribute name inside the capture wrapper


def op_name(node: fx.Node) -> str | None:
    """The ATen overload packet name of a call_function node ('conv2d'), else None."""
    if node.op != "call_function":
        return None
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(node.target, "__name__", None)


def shape_of(node: Any) -> tuple[int | None, ...] | None:
    """A node's tensor shape with symbolic sizes (the batch dim) as None; None if not a tensor."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, Tensor):
        return None
    return tuple(size if isinstance(size, int) else None for size in value.shape)


def scope(node: fx.Node) -> str | None:
    """Qualified name (in the user's model) of the innermost module ``node`` ran in."""
    stack = scopes(node)
    return stack[-1] if stack else None


def scopes(node: fx.Node) -> list[str]:
    """The qualified names of the modules ``node`` ran in, outermost first ('' = the model)."""
    names = []
    for path, _type in (node.meta.get("nn_module_stack") or {}).values():
        if path == INNER:
            names.append("")
        elif path.startswith(INNER + "."):
            names.append(path[len(INNER) + 1 :])
    return names


def parameter_name(node: fx.Node) -> str | None:
    """The model's qualified name of the parameter or buffer a get_attr node reads."""
    if node.op != "get_attr" or not isinstance(node.target, str) or not node.target.startswith(INNER + "."):
        return None
    return node.target[len(INNER) + 1 :]
