"""Structure cleaning after selection: dead neurons, the residual rule, backward pruning.

Masks here are *connection level*: for a Linear layer a (J, I) boolean matrix, for a Conv2d
a (J, C) matrix with one entry per kernel (a kernel is kept or removed as a whole), plus a
(J,) bias mask. A neuron/filter is alive while any of its incoming connections or its bias
is kept. Removing one removes all its incoming connections, its bias, the BatchNorm entries
that follow it and (where no other path feeds the same channel) its outgoing connections.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from ..analysis import ChannelGraph, Rule

Graph = ChannelGraph
_BLOCK_ENTRIES = 1 << 20  # weight entries NonzeroConnections reads at once


@dataclass
class LayerMask:
    """Connection-level keep mask of one layer.

    For a conv with ``groups`` = g the weight mask is (J, C/g), like the kernel's first two
    dims. ``shift`` (J,) marks the neurons whose following affine BatchNorm turns a zero input
    into a nonzero constant (``beta - gamma * mean / sqrt(var + eps)``): that constant
    counts as a bias kept by cleaning, so a filter without kernels still outputs it and is
    not removed for lacking incoming connections (only when dead or unused, which is exact).
    """

    weight: Tensor
    bias: Tensor | None
    shift: Tensor | None = None
    groups: int = 1  # of a grouped conv: filter j reads input channels of group j // (J / groups)
    # alive() and used_inputs() are kept between changes: cleaning asks for them over and over
    _alive: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _used: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def alive(self) -> Tensor:
        """(J,) which neurons/filters still have a kept connection, bias or BN shift."""
        if self._alive is None:
            alive = self.weight.any(dim=1)
            if self.bias is not None:
                alive = alive | self.bias
            self._alive = alive | self.shift if self.shift is not None else alive
        return self._alive.clone()

    def used_inputs(self) -> Tensor:
        """(C,) which input channels still feed a kept connection."""
        if self._used is None:
            filters, group_channels = self.weight.shape
            self._used = self.weight.view(self.groups, filters // self.groups, group_channels).any(dim=1).reshape(-1)
        return self._used.clone()

    def clear_inputs(self, live: Tensor) -> bool:
        """Drop the connections from input channels not in ``live`` (C,); whether any changed."""
        gone = self.used_inputs() & ~live
        if not bool(gone.any()):
            return False
        filters, group_channels = self.weight.shape
        per_group = gone.view(self.groups, 1, group_channels).expand(self.groups, filters // self.groups, group_channels)
        if self.groups == 1:
            self.weight[:, gone] = False  # only the columns that lose something
        else:
            self.weight &= ~per_group.reshape(filters, group_channels)
        self._alive = self._used = None
        return True

    def remove_neurons(self, remove: Tensor) -> bool:
        """Drop every incoming connection, the bias and the BN shift of the neurons in
        ``remove``; whether any of them was alive."""
        rows = (remove & self.alive()).nonzero().flatten()
        if rows.numel() == 0:
            return False
        self.weight[rows] = False
        if self.bias is not None:
            self.bias[rows] = False
        if self.shift is not None:
            self.shift[rows] = False
        self._alive[rows] = False
        self._used = None
        return True


class NonzeroConnections:
    """Connection-level mask of one layer read off its nonzero weights (and bias, and BN
    shift), answering cleaning as :class:`LayerMask` does without holding a mask of the
    weights' size: removals are kept as (J,) kept neurons and (C,) kept input channels, and
    :meth:`alive` / :meth:`used_inputs` read the weights again, block of rows by block of rows,
    after a removal that can change them. For compaction's analysis of a model as it is."""

    def __init__(self, weight: Tensor, bias: Tensor | None, shift: Tensor | None = None, groups: int = 1) -> None:
        self.weight, self.groups = weight, groups  # (J, C/g, *kernel): the layer's own weights, not copied
        filters, width = weight.shape[:2]
        self.rows = torch.ones(filters, dtype=torch.bool)
        self.inputs = torch.ones(groups * width, dtype=torch.bool)
        constant = torch.zeros(filters, dtype=torch.bool) if bias is None else (bias.detach() != 0).cpu()
        self.constant = constant | shift if shift is not None else constant  # alive without any connection
        self._alive: Tensor | None = None
        self._used: Tensor | None = None

    def alive(self) -> Tensor:
        """(J,) which neurons/filters still have a kept connection, bias or BN shift."""
        if self._alive is None:
            self._read()
        return self._alive.clone()

    def used_inputs(self) -> Tensor:
        """(C,) which input channels still feed a kept connection."""
        if self._used is None:
            self._read()
        return self._used.clone()

    def clear_inputs(self, live: Tensor) -> bool:
        """Drop the connections from input channels not in ``live`` (C,); whether any changed."""
        gone = self.used_inputs() & ~live
        if not bool(gone.any()):
            return False
        self.inputs &= ~gone
        self._used &= ~gone
        self._alive = None
        return True

    def remove_neurons(self, remove: Tensor) -> bool:
        """Drop the neurons in ``remove`` (their connections, bias and BN shift); whether any of them was alive."""
        removed = remove & self.alive()
        if not bool(removed.any()):
            return False
        self.rows &= ~removed
        self._alive &= ~removed
        self._used = None
        return True

    def _read(self) -> None:
        """Work out :meth:`alive` and :meth:`used_inputs` in one read of the weights."""
        reached, used = [], torch.zeros(self.groups, self.weight.shape[1], dtype=torch.bool)
        for groups, connections in self._blocks():  # amax: any() of a bool tensor, several times faster
            reached.append(connections.amax(dim=2).flatten())
            used[groups] |= connections.amax(dim=1)
        self._alive = self.rows & (torch.cat(reached) | self.constant)
        self._used = used.view(-1)

    def _blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """(groups, (groups, rows per group, C/g) the nonzero connections of their kept neurons
        from kept input channels), block by block: whole groups at once, or rows of one group."""
        filters, width = self.weight.shape[:2]
        per_group, row = filters // self.groups, max(1, self.weight[0].numel())
        whole = per_group * row <= _BLOCK_ENTRIES
        groups_at_once = max(1, _BLOCK_ENTRIES // (per_group * row)) if whole else 1
        rows_at_once = per_group * groups_at_once if whole else max(1, _BLOCK_ENTRIES // row)
        inputs = self.inputs.view(self.groups, 1, width)
        for first in range(0, self.groups, groups_at_once):
            groups = slice(first, min(first + groups_at_once, self.groups))
            end = groups.stop * per_group
            for start in range(first * per_group, end, rows_at_once):
                rows = slice(start, min(start + rows_at_once, end))
                nonzero = self.weight[rows].detach() != 0
                nonzero = (nonzero.flatten(2).amax(dim=2) if nonzero.dim() > 2 else nonzero).cpu()
                nonzero.index_fill_(0, (~self.rows[rows]).nonzero().flatten(), False)  # the removed neurons'
                yield groups, nonzero.view(groups.stop - groups.start, -1, width) & inputs[groups]


Connections = LayerMask | NonzeroConnections  # what cleaning reads and narrows


def batchnorm_constant(module: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """(C,) channels where ``module`` maps a zero input to a nonzero output, in eval mode
    (``beta - gamma * mean / sqrt(var + eps)``) or in train mode (``beta``)."""
    if not module.affine:
        return torch.ones(module.num_features, dtype=torch.bool)
    bias = module.bias.detach()
    nonzero = bias != 0
    if module.running_mean is not None:
        shift = module.weight.detach() * module.running_mean / torch.sqrt(module.running_var + module.eps)
        nonzero |= (bias - shift) != 0
    return nonzero.cpu()


def residual_decisions(branch_map: Tensor, shortcut_map: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """The residual rule for one block.

    ``branch_map`` and ``shortcut_map`` are (C, H, W) means over samples of |branch| and
    |shortcut|. With signals ``b_c``, ``s_c`` their Frobenius norms per channel and
    ``r = (1 - alpha) / alpha``: the branch filter c is pruned if ``b_c < r s_c``, the shortcut
    channel c is masked if ``s_c < r b_c``. Returns (prune_branch, mask_shortcut), (C,) bools.
    """
    branch = branch_map.flatten(1).norm(dim=1)
    shortcut = shortcut_map.flatten(1).norm(dim=1)
    ratio = (1.0 - alpha) / alpha
    return branch < ratio * shortcut, shortcut < ratio * branch


def live_channels(graph: Graph, masks: dict[str, Connections], gates: dict[str, Tensor]) -> dict[str, Tensor]:
    """Forward propagation: per node, which output channels may carry a nonzero signal.

    ``gates`` maps node names to (C,) channel masks applied to that node's output. Nodes
    without a channel axis (model inputs, constants, opaque results) count as all live.
    """
    live: dict[str, Tensor] = {}

    def of(source: str, size: int) -> Tensor:
        return live[source] if source in live else torch.ones(size, dtype=torch.bool)
    for name, rule in graph.rules.items():
        if rule.channels is None:
            continue
        if rule.rule is Rule.LAYER:
            value = masks[rule.layer].alive() if rule.layer in masks else torch.ones(rule.channels, dtype=torch.bool)
        elif rule.rule is Rule.PASS:
            value = live[rule.inputs[0]].clone() if rule.zero_preserving else torch.ones(rule.channels, dtype=torch.bool)
        elif rule.rule is Rule.FLATTEN:
            value = live[rule.inputs[0]].repeat_interleave(rule.spatial).repeat(getattr(rule, "outer", 1))
        elif rule.rule is Rule.MERGE and rule.product:
            value = torch.ones(rule.channels, dtype=torch.bool)
            for source in rule.inputs:
                value &= of(source, rule.channels)
        elif rule.rule is Rule.MERGE:
            value = torch.zeros(rule.channels, dtype=torch.bool)
            for source in rule.inputs:
                value |= of(source, rule.channels)
            if not rule.zero_preserving:
                value[:] = True
        elif rule.rule is Rule.CAT:
            value = torch.cat([live[source] for source in rule.inputs])
        elif rule.rule is Rule.PAD:
            front, back = rule.pad
            source = live[rule.inputs[0]]
            value = torch.cat([source.new_zeros(front), source, source.new_zeros(back)])
        else:
            value = torch.ones(rule.channels, dtype=torch.bool)
        if name in gates:
            value &= gates[name]
        live[name] = value
    return live


def used_channels(graph: Graph, masks: dict[str, Connections], gates: dict[str, Tensor]) -> dict[str, Tensor]:
    """Backward propagation: per node, which output channels reach a kept connection, the
    model output or an operation the graph does not understand."""
    used = {name: torch.zeros(rule.channels, dtype=torch.bool) for name, rule in graph.rules.items() if rule.channels is not None}

    def mark(source: str, value: Tensor | None) -> None:
        if source in used:
            used[source] |= value if value is not None else True

    for name, rule in reversed(graph.rules.items()):
        out = used.get(name)
        if out is not None and name in gates:
            out = out & gates[name]
        if rule.rule is Rule.LAYER:
            mask = masks.get(rule.layer)
            mark(rule.inputs[0], mask.used_inputs() if mask is not None else None)
        elif rule.rule in (Rule.PASS, Rule.MERGE):
            for source in rule.inputs:
                mark(source, out)
            for source in getattr(rule, "uses", ()):
                mark(source, None)
        elif rule.rule is Rule.FLATTEN:
            mark(rule.inputs[0], out.view(getattr(rule, "outer", 1), -1, rule.spatial).any(dim=2).any(dim=0))
        elif rule.rule is Rule.CAT:
            start = 0
            for source in rule.inputs:
                width = graph.rules[source].channels
                mark(source, out[start : start + width])
                start += width
        elif rule.rule is Rule.PAD:
            front = rule.pad[0]
            mark(rule.inputs[0], out[front : front + graph.rules[rule.inputs[0]].channels])
        elif rule.rule in (Rule.OPAQUE, Rule.OUTPUT):
            for source in rule.inputs:
                mark(source, None)
    return used


def clean(graph: Graph, masks: dict[str, Connections], gates: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove neurons without outgoing connections and connections from removed channels,
    repeated to a fixpoint (a shared layer: where every call agrees). Mutates ``masks``; returns the BatchNorm channel masks (by
    module name): a BatchNorm channel is kept while its input channel is live."""
    structured = {name: graph.layers[name].calls for name in masks if graph.layers[name].structured}
    while True:
        changed = False
        live = live_channels(graph, masks, gates)
        for name, calls in structured.items():
            inputs = [live[call.input_node] for call in calls if call.input_node in live]
            if inputs:
                changed |= masks[name].clear_inputs(torch.stack(inputs).any(dim=0))
        used = used_channels(graph, masks, gates)
        for name, calls in structured.items():
            changed |= masks[name].remove_neurons(~torch.stack([used[call.node] for call in calls]).any(dim=0))
        if not changed:
            break
    live = live_channels(graph, masks, gates)
    return {module: live[graph.rules[node].inputs[0]].clone() for node, module in graph.batchnorms.items()}
