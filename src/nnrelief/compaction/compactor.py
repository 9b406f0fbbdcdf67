"""Physically smaller models with the same outputs.

``compact(model, example)`` returns a new model in which every removed neuron/channel is
gone: rows and columns of Linear/Conv weights, BatchNorm entries, the FC columns a
removed conv channel fed through a flatten, and residual-stream channels where every
member of the coupled group allows it. Both routes work on the channel graph of the
model's one ``torch.export`` capture (:mod:`nnrelief.analysis`, the live/used
propagations of :mod:`nnrelief.pruning.cleaning`): the model's own class narrowed in place
(:mod:`nnrelief.compaction.narrowing`) wherever the forward allows it; otherwise a
``torch.fx.GraphModule`` made from the capture, with channel index maps
(:mod:`nnrelief.compaction.indexmaps`).

How channels are coupled: tensors joined by channel-preserving ops (activations,
BatchNorm, pooling, elementwise adds) must carry the same channels, so they form one
*group*. A group keeps channel c if any member may carry a nonzero signal there that some
consumer uses. A channel padding and a gated shortcut connect two groups through an index
map instead, so the residual streams before and after them keep their own channels.

Why not Torch-Pruning: its dependency graph treats ``F.pad`` along channels (the
option-A shortcut) as an elementwise op with a one-to-one channel mapping, so it couples
stages of different width with wrong indices and leaves ``PadShortcut.pad`` unchanged
(the model it returns fails in the forward). It also knows nothing about nnrelief's
shortcut gates (a forward hook with a buffer) nor about which channels are exactly zero.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..analysis import ChannelGraph, analyse
from ..analysis.capture import TensorOutputs
from ..analysis.layers import weight_matrix
from ..heap import release_freed_memory
from ..inputs import ModelInput, example_input
from ..kinds import kind_of
from ..metrics import ArchitectureSummary, file_size, summarize
from ..pruning.cleaning import NonzeroConnections, batchnorm_constant, clean, live_channels, used_channels
from ..pruning.diagnostics import rejected_input
from ..pruning.masks import _GATE_HOOK, GATE, gate_of, make_permanent
from .export import _eval_mode, save_sparse
from .indexmaps import MappedPlan
from .narrowing import Declined, InPlacePlan

log = logging.getLogger(__name__)


def compact(model: nn.Module, example: Any = None) -> nn.Module:
    """A new, physically smaller model giving the same outputs as ``model`` in eval mode.

    ``model`` may carry nnrelief masks and shortcut gates (or plain zero weights); it is
    not modified. ``example`` is one input batch used to capture shapes: a tensor, a tuple of
    positional inputs or a dict of keyword inputs (a Hugging Face batch); it may be omitted
    when the first Linear layer reads the raw (N, features) input.

    Wherever the forward allows it the result is a copy of the model's own class with its
    modules narrowed in place (:mod:`nnrelief.compaction.narrowing`): plain parameters (zeros where
    unstructured sparsity remains), no hooks, no masks. A Hugging Face model's ``config``
    still names the old sizes. A module that pads channels (the option-A shortcut of the
    zoo's CIFAR ResNets) or whose shortcut gate drops channels is wrapped in a
    :class:`~nnrelief.compaction.narrowing.ChannelMap` (an index map after it); a gate on an affine
    BatchNorm is folded into it. Where an index map has no module of its own to follow (a
    channel padding written in the forward), a flatten's consumers keep channels its input
    no longer gives, or the forward hard-codes sizes, the result is a
    ``torch.fx.GraphModule`` made from the model's capture (:mod:`nnrelief.compaction.indexmaps`).
    Either is checked to give the same outputs on ``example``. A model ``torch.export``
    cannot capture gets its masks folded in, no channel removed (a warning says so).

    Memory: the copy is built layer by layer. It starts as a copy of the module tree sharing
    every tensor with ``model``; narrowing gives each sliced module new, smaller tensors
    (each gathered once), and what is left shared is copied at the end. The structure
    analysis reads the nonzero weights block of rows by block of rows (no mask of the
    weights' size), and the heap the forwards and the analysis freed is handed back
    (:mod:`nnrelief.heap`) before the new tensors are allocated. So beyond ``model``
    compaction holds the compacted model and one layer's temporaries, never a second full copy.
    """
    example = example_input(example if example is not None else _default_example(model))
    with _eval_mode(model):  # capturing and checking run forwards: no BN statistics update
        rejected = rejected_input(model, example)
        if rejected is not None:
            raise ValueError(f"compact: {rejected}".replace("a pruning batch", "the example"))
        expected = _outputs(model, example)
    work = _sharing_copy(model).eval()
    gates = _take_gates(work)
    make_permanent(work)
    compacted = _narrow(work, gates, example, expected)
    if compacted is None:
        _fold_gates(work, gates)
        log.warning("compact: %s could not be compacted; masks folded in, no channel removed", type(model).__name__)
        compacted = work
    release_freed_memory()  # what the checking forward freed, before the copies below
    _unshare(compacted, model)
    return compacted.train(model.training)


def _sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules whose parameters and buffers are ``model``'s own tensors."""
    memo: dict[int, Any] = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _unshare(compacted: nn.Module, model: nn.Module) -> None:
    """Give ``compacted`` its own copy of every tensor it still shares with ``model`` (ties kept)."""
    shared = {id(tensor) for tensor in itertools.chain(model.parameters(), model.buffers())}
    copies: dict[int, Tensor] = {}
    for module in compacted.modules():
        for table, make in ((module._parameters, lambda t: nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)),
                            (module._buffers, lambda t: t.clone())):  # fmt: skip
            for name, tensor in table.items():
                if tensor is not None and id(tensor) in shared:
                    table[name] = copies.setdefault(id(tensor), make(tensor))


def _narrow(work: nn.Module, gates: dict[str, Tensor], example: ModelInput, expected: tuple[Tensor, ...]) -> nn.Module | None:
    """``work`` (masks permanent, its shortcut ``gates`` taken off) narrowed in place, else as
    a GraphModule with index maps, else None; the route taken and why is logged. Gates on a
    BatchNorm are folded into it; the others become index maps. ``work``'s tensors are not
    changed (narrowing gives modules new ones)."""
    name = type(work).__name__
    copy_ = _Copy.of(work, gates, example)
    if copy_ is None:
        return None
    release_freed_memory()  # what the forwards and the analysis freed, before the sliced tensors are allocated
    try:
        plan = InPlacePlan(copy_.model, copy_.graph, copy_.live, copy_.used, copy_.gates)
    except Declined as reason:
        log.info("compact: %s not narrowed in place: %s", name, reason)
        return _mapped(copy_, example, expected)
    removed = plan.apply()
    problem = _mismatch(copy_.model, example, expected)
    if problem is None:
        log.info("compact: %s narrowed in place, %d parameter entries removed", name, removed)
        return copy_.model
    log.info("compact: %s narrowed in place %s", name, problem)
    fresh = _Copy.of(work, gates, example)  # the copy is sliced: the other route starts again
    return None if fresh is None else _mapped(fresh, example, expected)


@dataclass
class _Copy:
    """A copy of the model to compact (BatchNorm gates folded in), its channel graph, its
    other gates by graph node and the live/used channels."""

    model: nn.Module
    graph: ChannelGraph
    gates: dict[str, Tensor]
    live: dict[str, Tensor]
    used: dict[str, Tensor]

    @classmethod
    def of(cls, work: nn.Module, gates: dict[str, Tensor], example: ModelInput) -> _Copy | None:
        model = _sharing_copy(work)
        rest = _fold_batchnorm_gates(model, gates)
        graph = analyse(model, example)
        if not graph.traced:
            log.info("compact: %s", graph.reason)
            return None
        nodes = {module: node for node, module in graph.gates.items()}
        if not set(rest) <= set(nodes):
            log.info("compact: cannot locate the output of gated module(s) %s", sorted(set(rest) - set(nodes)))
            return None
        node_gates = {nodes[module]: gate for module, gate in rest.items()}
        live, used = _analyse(model, graph, node_gates)
        return cls(model, graph, node_gates, live, used)


def _mapped(copy_: _Copy, example: ModelInput, expected: tuple[Tensor, ...]) -> nn.Module | None:
    """The copy as a GraphModule with index maps, or None."""
    name = type(copy_.model).__name__
    with torch.no_grad():
        raw = copy_.model(*example.args, **example.kwargs)
    try:
        if not isinstance(raw, Tensor) and not (isinstance(raw, tuple) and all(isinstance(v, Tensor) for v in raw)):
            raise Declined(f"it returns a {type(raw).__name__}, not tensors")
        plan = MappedPlan(copy_.model, copy_.graph, copy_.live, copy_.used, copy_.gates)
        module, removed = plan.build(single_output=isinstance(raw, Tensor))
    except Declined as reason:
        log.info("compact: %s has no GraphModule with index maps: %s", name, reason)
        return None
    except Exception as error:  # noqa: BLE001 - a capture the rewrite does not handle: masks folded instead
        log.warning("compact: %s: building the GraphModule with index maps failed (%s: %s)", name, type(error).__name__, error)
        return None
    problem = _mismatch(module, example, expected)
    if problem is not None:
        log.warning("compact: %s as a GraphModule with index maps %s", name, problem)
        return None
    log.info("compact: %s needs channel index maps in its graph: a torch.fx GraphModule, %d parameter entries removed", name, removed)
    return module


def _mismatch(model: nn.Module, example: ModelInput, expected: tuple[Tensor, ...]) -> str | None:
    """None if ``model`` gives ``expected`` on ``example``, else what went wrong."""
    try:
        actual = _outputs(model, example)
    except Exception as error:  # noqa: BLE001 - a forward with hard-coded sizes: take another route
        return f"fails ({type(error).__name__}: {error})"
    if len(actual) != len(expected) or not all(_close(a, e) for a, e in zip(actual, expected)):
        return "gives other outputs (hard-coded sizes?)"
    return None


def compacted_widths(model: nn.Module, graph: ChannelGraph) -> dict[str, int] | None:
    """The output channels each layer of ``graph`` keeps once ``model`` (masked, gated) is
    compacted in place: a channel stays while any member of its coupled group (a residual
    stage, a gated product) carries it. None where compaction needs index maps instead.
    Read off the model's graph (nothing is captured, ``graph`` is left as it is)."""
    if not graph.traced:
        return None
    modules = dict(model.named_modules())
    gates = {node: gate_of(modules[name]) for node, name in graph.gates.items() if gate_of(modules[name]) is not None}
    view = dataclasses.replace(graph, rules={name: dataclasses.replace(rule) for name, rule in graph.rules.items()})
    live, used = _analyse(model, view, {node: gate.cpu() for node, gate in gates.items()})
    plan = None
    for route in (InPlacePlan, MappedPlan):
        try:
            plan = route(model, view, live, used, gates)
            break
        except Declined:
            continue
    if plan is None:
        return None
    return {
        name: int(plan.keep[layer.calls[0].node].sum())
        for name, layer in graph.layers.items() if layer.structured and layer.calls[0].node in plan.keep
    }  # fmt: skip


def _fold_batchnorm_gates(model: nn.Module, gates: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fold the gates of affine BatchNorms into them exactly (gated-off entries zeroed);
    returns the other gates."""
    rest = {}
    for name, gate in gates.items():
        module = model.get_submodule(name)
        if bool(gate.all()):
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            for attribute in ("weight", "bias"):  # new tensors: the shared ones stay as they are
                tensor = getattr(module, attribute)
                kept = tensor.detach() * gate.to(tensor.device, tensor.dtype)
                setattr(module, attribute, nn.Parameter(kept, requires_grad=tensor.requires_grad))
        else:
            rest[name] = gate
    return rest


def _fold_gates(model: nn.Module, gates: dict[str, Tensor]) -> None:
    """Make the shortcut gates part of the model, exactly and with torch modules only: a gated
    affine BatchNorm gets its gated-off entries zeroed; any other gated module is followed by
    a depthwise 1x1 ``nn.Conv2d`` whose weights are the gate (0 or 1 per channel)."""
    for name, gate in _fold_batchnorm_gates(model, gates).items():
        module = model.get_submodule(name)
        like = next(model.parameters())
        scale = nn.Conv2d(len(gate), len(gate), 1, groups=len(gate), bias=False).to(like.device, like.dtype)
        with torch.no_grad():
            scale.weight.copy_(gate.to(like.device, like.dtype).view(-1, 1, 1, 1))
        parent, _, attribute = name.rpartition(".")
        replacement = scale if isinstance(module, nn.Identity) else nn.Sequential(module, scale)
        setattr(model.get_submodule(parent), attribute, replacement)


def _outputs(model: nn.Module, example: ModelInput) -> tuple[Tensor, ...]:
    with torch.no_grad():
        return TensorOutputs(model)(*example.args, **example.kwargs)


def _close(actual: Tensor, expected: Tensor) -> bool:
    if actual.shape != expected.shape:
        return False
    if not expected.is_floating_point():
        return torch.equal(actual, expected)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


def _default_example(model: nn.Module) -> Tensor:
    """A zero batch of one for a model whose first layer's kind knows its input shape (a Linear)."""
    first = next((m for m in model.modules() if kind_of(m) is not None), None)
    example = None if first is None else kind_of(first).example_input(first)
    if example is None:
        raise ValueError("compact needs an example input batch for this model (its first layer is not a Linear)")
    return example


def _take_gates(model: nn.Module) -> dict[str, Tensor]:
    """Remove the shortcut gates (buffer + hook) from ``model``; return them by module name."""
    gates: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if GATE in module._buffers:
            gates[name] = module._buffers.pop(GATE).bool().cpu()
            getattr(module, _GATE_HOOK).remove()
            delattr(module, _GATE_HOOK)
    return gates


def _connections(model: nn.Module, graph: ChannelGraph) -> dict[str, NonzeroConnections]:
    """Each layer's connections as its nonzero weights and biases say (read from the weights, nothing copied)."""
    return {
        name: NonzeroConnections(weight_matrix(layer.module), layer.module.bias, None if layer.batchnorm is None
                                 else batchnorm_constant(model.get_submodule(layer.batchnorm)), getattr(layer.module, "groups", 1))
        for name, layer in graph.layers.items()
    }  # fmt: skip


def _analyse(model: nn.Module, graph: ChannelGraph, gates: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(live, used) channels per node after cleaning the connections of the nonzero weights.

    The graph treats an affine BatchNorm as zero-preserving (true after nnrelief masks the
    BN entries of removed channels). Where a BN would turn a dead channel into a nonzero
    constant, it is marked as not zero-preserving, to a fixpoint, so nothing live is lost.
    """
    modules = dict(model.named_modules())
    while True:
        masks = _connections(model, graph)
        clean(graph, masks, gates)
        live = live_channels(graph, masks, gates)
        changed = False
        for node, module_name in graph.batchnorms.items():
            rule = graph.rules[node]
            if rule.zero_preserving and bool((~live[rule.inputs[0]] & batchnorm_constant(modules[module_name])).any()):
                rule.zero_preserving = False
                changed = True
        if not changed:
            return live, used_channels(graph, masks, gates)


def compaction_summary(masked_model: nn.Module, compacted_model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Before/after figures of a compaction, for one sample of ``input_shape`` (no batch dim).

    Returns ``{"input_shape", "before", "after", "files"}``: ``before``/``after`` are
    :meth:`ArchitectureSummary.to_dict` of the masked and the compacted model (nonzero and
    dense parameters, dense and sparse MACs, alive channels per layer); ``files`` has the
    sizes in bytes of the masked model's ``state_dict`` (``dense_masked``), the compacted
    model's ``state_dict`` (``compacted``) and its :func:`save_sparse` file (``sparse``).
    """
    before: ArchitectureSummary = summarize(masked_model, input_shape)
    after: ArchitectureSummary = summarize(compacted_model, input_shape)
    with tempfile.TemporaryDirectory() as folder:
        dense_path, compact_path, sparse_path = (Path(folder) / n for n in ("masked.pt", "compact.pt", "sparse.pt"))
        torch.save(masked_model.state_dict(), dense_path)
        torch.save(compacted_model.state_dict(), compact_path)
        save_sparse(compacted_model, sparse_path)
        files = {"dense_masked": file_size(dense_path), "compacted": file_size(compact_path), "sparse": file_size(sparse_path)}
    return {"input_shape": list(input_shape), "before": before.to_dict(), "after": after.to_dict(), "files": files}


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable text of :func:`compaction_summary`'s dict."""
    before, after, files = summary["before"], summary["after"], summary["files"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "inf"

    rows: list[tuple[str, Callable[[dict[str, Any]], int]]] = [
        ("remaining params (Linear/conv, nonzero)", lambda s: s["params_nonzero"]),
        ("stored params (Linear/conv, dense)", lambda s: s["params_total"]),
        ("all params (nonzero)", lambda s: s["all_params_nonzero"]),
        ("all params (dense)", lambda s: s["all_params_total"]),
        ("MACs per sample (dense)", lambda s: s["macs_dense"]),
        ("MACs per sample (nonzero weights)", lambda s: s["macs_sparse"]),
    ]
    lines = [f"compaction summary for input shape {tuple(summary['input_shape'])}",
             f"{'':<42} {'masked':>14} {'compacted':>14} {'ratio':>8}"]
    for label, get in rows:
        lines.append(f"{label:<42} {get(before):>14,} {get(after):>14,} {ratio(get(before), get(after)):>8}")
    lines.append("architecture (alive / stored channels per layer):")
    stored = {layer["name"]: layer["channels_total"] for layer in after["layers"]}
    for layer in before["layers"]:
        name = layer["name"]
        lines.append(f"  {name:<40} {layer['channels_alive']:>6} / {layer['channels_total']:<6} -> {stored.get(name, 0)}")
    lines.append("files:")
    for key, label in (("dense_masked", "masked state_dict"), ("compacted", "compacted state_dict"), ("sparse", "sparse (save_sparse)")):
        lines.append(f"  {label:<40} {files[key]:>12,} bytes  ({ratio(files['dense_masked'], files[key])} smaller)")
    return "\n".join(lines)
