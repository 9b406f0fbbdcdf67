"""Physically smaller models with the same outputs.

``compact(model, example)`` returns a new model in which every removed neuron/channel is
gone: rows and columns of Linear/Conv2d weights, BatchNorm entries, the FC columns a
removed conv channel fed through a flatten, and residual-stream channels where every
member of the coupled group allows it. It is the model's own class narrowed in place
(:mod:`nnrelief.narrowing`, on the channel graph of :mod:`nnrelief.analysis`) wherever the
forward allows it; otherwise a ``torch.fx.GraphModule`` with channel index maps, as
described next (:func:`nnrelief.graph.build_graph`, the live/used propagations of
:mod:`nnrelief.cleaning`).

How channels are coupled: tensors joined by channel-preserving ops (activations,
BatchNorm, pooling, elementwise adds) must carry the same channels, so they form one
*group*. A group keeps channel c if any member may carry a nonzero signal there that some
consumer uses. Ops that move channels (flatten, concatenation, zero padding on channels
such as the option-A shortcut) and shortcut gates connect two groups through an index
map: where the two groups' kept channels differ, a ``pad`` (one zero channel) and an
``index_select`` (a constant index buffer) place the kept source channels into the kept
target channels. So the compacted model only uses standard torch ops: it needs no
nnrelief at inference, scripts, exports and pickles like any GraphModule.

Why not Torch-Pruning: its dependency graph treats ``F.pad`` along channels (the
option-A shortcut) as an elementwise op with a one-to-one channel mapping, so it couples
stages of different width with wrong indices and leaves ``PadShortcut.pad`` unchanged
(the model it returns fails in the forward). It also knows nothing about nnrelief's
shortcut gates (a forward hook with a buffer) nor about which channels are exactly zero.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .analysis import ChannelGraph, analyse
from .analysis.capture import TensorOutputs
from .analysis.layers import weight_matrix
from .cleaning import LayerMask, batchnorm_constant, clean, live_channels, used_channels
from .diagnostics import rejected_input
from .export import save_sparse
from .graph import ModelGraph, NodeRule, Rule, build_graph
from .inputs import ModelInput, example_input
from .masks import _GATE_HOOK, GATE, gate_of, make_permanent
from .metrics import ArchitectureSummary, file_size, summarize
from .narrowing import Declined, Groups, InPlacePlan

log = logging.getLogger(__name__)


def compact(model: nn.Module, example: Any = None) -> nn.Module:
    """A new, physically smaller model giving the same outputs as ``model`` in eval mode.

    ``model`` may carry nnrelief masks and shortcut gates (or plain zero weights); it is
    not modified. ``example`` is one input batch used to capture shapes: a tensor, a tuple of
    positional inputs or a dict of keyword inputs (a Hugging Face batch); it may be omitted
    when the first Linear layer reads the raw (N, features) input.

    Wherever the forward allows it the result is a copy of the model's own class with its
    modules narrowed in place (:mod:`nnrelief.narrowing`; checked to give the same outputs
    on ``example``): plain parameters (zeros where unstructured sparsity remains), no
    hooks, no masks. A Hugging Face model's ``config`` still names the old sizes. Where
    removing channels needs index maps (a channel padding such as the option-A shortcut
    of the zoo's CIFAR ResNets, a gate on a shortcut without a BatchNorm to fold it into),
    the result is a ``torch.fx.GraphModule`` that holds them, if ``torch.fx`` can trace the
    model; otherwise the masks are folded in and no channel is removed (a warning says so).
    """
    work = _clone(model).eval()  # capturing runs a forward: no BN statistics update
    example = example_input(example if example is not None else _default_example(work))
    rejected = rejected_input(work, example)
    if rejected is not None:
        raise ValueError(f"compact: {rejected}".replace("a pruning batch", "the example"))
    gates = _take_gates(work)
    make_permanent(work)
    narrowed = _narrow(work, gates, example)
    if narrowed is not None:
        return narrowed.train(model.training)
    graph = build_graph(work, example)
    if not graph.traced:
        if gates:
            raise ValueError("model carries shortcut gates but cannot be narrowed in place nor traced by torch.fx")
        log.warning("compact: %s cannot be narrowed in place nor traced; masks folded in, no channel removed", type(model).__name__)
        return work.train(model.training)
    node_gates = _gates_by_node(graph, gates)
    plan = _Plan(graph, node_gates)
    gm = plan.apply()
    gm.train(model.training)
    removed = sum(int(p.numel()) for p in model.parameters()) - sum(int(p.numel()) for p in gm.parameters())
    log.info("compact: %s needs channel index maps: a torch.fx GraphModule, %d parameter entries removed", type(model).__name__, removed)
    return gm


def _narrow(work: nn.Module, gates: dict[str, Tensor], example: ModelInput) -> nn.Module | None:
    """A copy of ``work`` (gates folded into BatchNorms) narrowed in place, or None with the
    reason logged (the caller then builds a GraphModule)."""
    candidate = _clone(work)
    try:
        _fold_gates(candidate, gates)
        graph = analyse(candidate, example)
        if not graph.traced:
            raise Declined(graph.reason or "no capture")
        expected = _outputs(candidate, example)
        live, used = _analyse(candidate, graph, {})
        removed = InPlacePlan(candidate, graph, live, used).apply()
    except Declined as reason:
        log.info("compact: %s not narrowed in place: %s", type(work).__name__, reason)
        return None
    try:
        actual = _outputs(candidate, example)
    except Exception as error:  # noqa: BLE001 - a forward with hard-coded sizes: take the other route
        log.info("compact: %s fails once narrowed in place (%s: %s)", type(work).__name__, type(error).__name__, error)
        return None
    if len(actual) != len(expected) or not all(_close(a, e) for a, e in zip(actual, expected)):
        log.info("compact: %s narrowed in place gives other outputs (hard-coded sizes?)", type(work).__name__)
        return None
    log.info("compact: %s narrowed in place, %d parameter entries removed", type(work).__name__, removed)
    return candidate


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
    try:
        live, used = _analyse(model, view, {node: gate.cpu() for node, gate in gates.items()})
        plan = InPlacePlan(model, view, live, used, gated=frozenset(gates))
    except Declined:
        return None
    return {
        name: int(plan.keep[layer.calls[0].node].sum())
        for name, layer in graph.layers.items() if layer.structured and layer.calls[0].node in plan.keep
    }  # fmt: skip


def _fold_gates(model: nn.Module, gates: dict[str, Tensor]) -> None:
    """Make the shortcut gates part of the model, exactly and with torch modules only: a gated
    affine BatchNorm gets its gated-off entries zeroed; any other gated module is followed by
    a depthwise 1x1 ``nn.Conv2d`` whose weights are the gate (0 or 1 per channel), which the
    narrowing then treats as any layer (a gated-off channel it alone carries goes)."""
    for name, gate in gates.items():
        module = model.get_submodule(name)
        if bool(gate.all()):
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            with torch.no_grad():
                module.weight[~gate.to(module.weight.device)] = 0.0
                module.bias[~gate.to(module.bias.device)] = 0.0
            continue
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


def _clone(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copes with masked ``.weight`` attributes (non-leaf tensors)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _default_example(model: nn.Module) -> Tensor:
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if not isinstance(first, nn.Linear):
        raise ValueError("compact needs an example input batch for this model (its first layer is not a Linear)")
    return torch.zeros(1, first.in_features, dtype=first.weight.dtype, device=first.weight.device)


def _take_gates(model: nn.Module) -> dict[str, Tensor]:
    """Remove the shortcut gates (buffer + hook) from ``model``; return them by module name."""
    gates: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if GATE in module._buffers:
            gates[name] = module._buffers.pop(GATE).bool().cpu()
            getattr(module, _GATE_HOOK).remove()
            delattr(module, _GATE_HOOK)
    return gates


def _gates_by_node(graph: ModelGraph, gates: dict[str, Tensor]) -> dict[str, Tensor]:
    nodes_of = {module: node for node, module in graph.gates.items()}
    for node in graph.module.graph.nodes:
        if node.op == "call_module":
            nodes_of.setdefault(node.target, node.name)
    missing = sorted(set(gates) - set(nodes_of))
    if missing:
        raise ValueError(f"cannot locate the output node of gated module(s) {missing} in the traced graph")
    return {nodes_of[module]: gate for module, gate in gates.items()}


def _effective_masks(model: nn.Module, graph: ModelGraph | ChannelGraph) -> dict[str, LayerMask]:
    """Connection-level masks read off the actual nonzero weights and biases."""
    masks = {}
    for name, layer in graph.layers.items():
        weight = weight_matrix(layer.module).detach() != 0
        weight = weight.flatten(2).any(dim=2) if weight.dim() > 2 else weight
        bias = layer.module.bias
        shift = None if layer.batchnorm is None else batchnorm_constant(model.get_submodule(layer.batchnorm))

        groups = getattr(layer.module, "groups", 1)
        masks[name] = LayerMask(weight.cpu(), None if bias is None else (bias.detach() != 0).cpu(), shift, groups)
    return masks


def _analyse(model: nn.Module, graph: ModelGraph | ChannelGraph, gates: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(live, used) channels per node after cleaning a copy of the effective masks.

    The graph treats an affine BatchNorm as zero-preserving (true after nnrelief masks the
    BN entries of removed channels). Where a BN would turn a dead channel into a nonzero
    constant, it is marked as not zero-preserving, to a fixpoint, so nothing live is lost.
    """
    modules = dict(model.named_modules())
    while True:
        masks = _effective_masks(model, graph)
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


def _has_literal_shape(node: fx.Node) -> bool:
    """A view/reshape whose target shape has hard-coded sizes beyond the batch dim."""
    is_reshape = (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target is torch.reshape
    )
    if not is_reshape:
        return False
    shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return any(isinstance(size, int) and size != -1 for size in list(shape)[1:])


@dataclass
class _Map:
    """Channel index map inserted after ``node``: output k <- input ``index[k]`` (or zero)."""

    node: str
    index: Tensor
    zero_fill: bool


class _Plan:
    """Which channels every tensor of the traced model keeps, and the surgery doing it."""

    def __init__(self, graph: ModelGraph, gates: dict[str, Tensor]) -> None:
        self.graph = graph
        self.gm = graph.module
        self.gates = gates
        self.nodes = {node.name: node for node in self.gm.graph.nodes}
        self.modules = dict(self.gm.named_modules())
        live, used = _analyse(graph.module, graph, gates)
        self.groups = Groups()
        forced: set[str] = set()
        self._couple(forced)
        self.keep = self._decide(live, used, forced)

    # -- analysis

    def _vars(self) -> Iterator[tuple[str, NodeRule]]:
        for name, rule in self.graph.rules.items():
            if rule.channels is not None:
                yield name, rule

    def _couple(self, forced: set[str]) -> None:
        rules = self.graph.rules
        calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for name, rule in rules.items():
            node = self.nodes[name]
            has_channels = rule.channels is not None
            inputs = [source for source in rule.inputs if rules[source].channels is not None]
            if rule.rule in (Rule.PASS, Rule.MERGE) and has_channels:
                for source in inputs[1:]:
                    self.groups.union(inputs[0], source)
                if name not in self.gates:
                    self.groups.union(name, inputs[0])
                if node.op == "call_module" and self._holds_channel_state(node.target, calls):
                    forced.update([name, *inputs])
                if _has_literal_shape(node):
                    forced.update([name, *inputs])
            elif rule.rule is Rule.LAYER and getattr(self.modules[rule.layer], "groups", 1) > 1:
                if _is_depthwise(self.modules[rule.layer]):
                    self.groups.union(name, inputs[0])  # channel c reads input channel c only
                else:
                    forced.update([name, *inputs])  # whole groups only: kept as they are
            elif rule.rule is Rule.FLATTEN and _has_literal_shape(node):
                forced.update([name, *inputs])
            elif rule.rule in (Rule.OPAQUE, Rule.OUTPUT):
                forced.update(inputs)
                if has_channels:
                    forced.add(name)
            elif rule.rule is Rule.INPUT and has_channels:
                forced.add(name)

    def _holds_channel_state(self, target: str, calls: dict[str, int]) -> bool:
        """Whether a pass-through module has per-channel state we cannot slice safely."""
        module = self.modules[target]
        has_state = any(True for _ in module.parameters(recurse=False)) or any(
            b is not None for b in module._buffers.values()
        )
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return calls[target] > 1
        return has_state

    def _decide(self, live: dict[str, Tensor], used: dict[str, Tensor], forced: set[str]) -> dict[str, Tensor]:
        demand: dict[str, Tensor] = {}
        for name, rule in self._vars():
            root = self.groups.find(name)
            need = torch.ones(rule.channels, dtype=torch.bool) if name in forced else live[name] & used[name]
            demand[root] = demand[root] | need if root in demand else need.clone()
        keep = {name: demand[self.groups.find(name)] for name, _ in self._vars()}
        # Flatten/concat outputs keep whole channel blocks: no index map needed after them.
        changed = True
        while changed:
            changed = False
            for name, rule in self._vars():
                if rule.rule in (Rule.FLATTEN, Rule.CAT):
                    natural = self._natural_mask(name, keep)
                    root_keep = keep[name]
                    if bool((natural & ~root_keep).any()):
                        root_keep |= natural
                        changed = True
        for name, _rule in self._vars():
            if not bool(keep[name].any()):
                keep[name][0] = True  # never build zero-width layers; an extra channel is exact
        return keep

    def _natural_mask(self, name: str, keep: dict[str, Tensor]) -> Tensor:
        """Original channels node ``name`` produces, given its inputs' kept channels."""
        rule = self.graph.rules[name]
        if rule.rule is Rule.FLATTEN:
            return keep[rule.inputs[0]].repeat_interleave(rule.spatial)
        if rule.rule is Rule.CAT:
            return torch.cat([keep[source] for source in rule.inputs])
        if rule.rule is Rule.PAD:
            source = keep[rule.inputs[0]]
            front, back = rule.pad
            return torch.cat([source.new_zeros(front), source, source.new_zeros(back)])
        if rule.rule in (Rule.PASS, Rule.MERGE):
            return keep[rule.inputs[0]]
        return keep[name]

    def _maps(self) -> list[_Map]:
        maps = []
        for name, rule in self._vars():
            if rule.rule not in (Rule.FLATTEN, Rule.CAT, Rule.PAD) and name not in self.gates:
                continue
            natural = self._natural_mask(name, self.keep).nonzero().flatten()
            target = self.keep[name].nonzero().flatten()
            gate = self.gates.get(name)
            position = torch.full((rule.channels,), len(natural), dtype=torch.long)
            position[natural] = torch.arange(len(natural))
            if gate is not None:
                position[~gate] = len(natural)
            index = position[target]
            if len(index) == len(natural) and torch.equal(index, torch.arange(len(natural))):
                continue
            maps.append(_Map(name, index, bool((index == len(natural)).any())))
        return maps

    # -- surgery

    def apply(self) -> fx.GraphModule:
        with torch.no_grad():
            for name, rule in self._vars():
                node = self.nodes[name]
                if rule.rule is Rule.LAYER:
                    self._slice_layer(self.modules[rule.layer], self.keep[name], self.keep[rule.inputs[0]])
                elif rule.rule is Rule.PASS and node.op == "call_module" and isinstance(
                    self.modules[node.target], nn.modules.batchnorm._BatchNorm
                ):
                    _slice_batchnorm(self.modules[node.target], self.keep[rule.inputs[0]])
        for number, entry in enumerate(self._maps()):
            self._insert_map(number, entry)
        for name, rule in self._vars():
            if rule.rule is Rule.PAD:
                self._drop_channel_pad(self.nodes[name])
        for node in self.gm.graph.nodes:
            if isinstance(node.type, str):
                # String annotations (``from __future__ import annotations``) make
                # GraphModule.__reduce__ fail in torch 2.13, so the model could not be pickled.
                node.type = None
        self.gm.graph.eliminate_dead_code()
        self.gm.graph.lint()
        self.gm.recompile()
        self.gm.delete_all_unused_submodules()
        return self.gm

    def _slice_layer(self, module: nn.Module, rows: Tensor, cols: Tensor) -> None:
        rows_idx, cols_idx = rows.nonzero().flatten(), cols.nonzero().flatten()
        device = module.weight.device
        weight = module.weight.detach()[rows_idx.to(device)]
        if getattr(module, "groups", 1) > 1:
            if _is_depthwise(module):  # rows and cols are the same channels (coupled)
                module.groups = len(rows_idx)
        else:
            weight = weight[:, cols_idx.to(device)]
        weight = weight.clone()
        module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach()[rows_idx.to(device)].clone(), requires_grad=module.bias.requires_grad)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = len(rows_idx), len(cols_idx)
        else:
            module.out_channels, module.in_channels = len(rows_idx), len(cols_idx)

    def _drop_channel_pad(self, node: fx.Node) -> None:
        """Remove the channel part of a zero pad (the index map places the channels)."""
        pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
        channel_pair = len(node.args[0].meta["tensor_meta"].shape) - 2
        pad[2 * channel_pair] = pad[2 * channel_pair + 1] = 0
        if not any(pad):
            node.replace_all_uses_with(node.args[0])
        elif len(node.args) > 1:
            node.args = (node.args[0], tuple(pad), *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "pad": tuple(pad)}

    def _insert_map(self, number: int, entry: _Map) -> None:
        node = self.nodes[entry.node]
        users = list(node.users)
        buffer = f"channel_map_{number}"
        self.gm.register_buffer(buffer, entry.index.to(self._device()))
        ndim = len(node.meta["tensor_meta"].shape)
        graph = self.gm.graph
        with graph.inserting_after(node):
            index = graph.get_attr(buffer)
        current, anchor = node, index
        if entry.zero_fill:
            with graph.inserting_after(index):
                current = anchor = graph.call_function(F.pad, (node, (0, 0) * (ndim - 2) + (0, 1)))
        with graph.inserting_after(anchor):
            selected = graph.call_function(torch.index_select, (current, 1, index))
        for user in users:
            user.replace_input_with(node, selected)

    def _device(self) -> torch.device:
        parameter = next(self.gm.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")


def _is_depthwise(module: nn.Module) -> bool:
    """A conv whose every output channel reads exactly the input channel of the same index."""
    groups = getattr(module, "groups", 1)
    return groups > 1 and module.in_channels == groups and module.out_channels == groups


def _slice_batchnorm(module: nn.modules.batchnorm._BatchNorm, keep: Tensor) -> None:
    index = keep.nonzero().flatten()
    for name in ("weight", "bias"):
        tensor = getattr(module, name)
        if tensor is not None:
            setattr(module, name, nn.Parameter(tensor.detach()[index.to(tensor.device)].clone(), requires_grad=tensor.requires_grad))
    for name in ("running_mean", "running_var"):
        tensor = getattr(module, name)
        if tensor is not None:
            setattr(module, name, tensor[index.to(tensor.device)].clone())
    module.num_features = len(index)


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
