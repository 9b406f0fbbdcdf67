"""Structure cleaning after selection: dead neurons, the residual rule, backward pruning.

Masks here are *connection level*: for a Linear layer a (J, I) boolean matrix, for a Conv2d
a (J, C) matrix with one entry per kernel (a kernel is kept or removed as a whole), plus a
(J,) bias mask. A neuron/filter is alive while any of its incoming connections or its bias
is kept. Removing one removes all its incoming connections, its bias, the BatchNorm entries
that follow it and (where no other path feeds the same channel) its outgoing connections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .graph import ModelGraph, Rule


@dataclass
class LayerMask:
    """Connection-level keep mask of one layer."""

    weight: Tensor
    bias: Tensor | None

    def alive(self) -> Tensor:
        """(J,) which neurons/filters still have a kept connection or bias."""
        alive = self.weight.any(dim=1)
        return alive | self.bias if self.bias is not None else alive

    def remove_neurons(self, remove: Tensor) -> None:
        """Drop every incoming connection and the bias of the neurons in ``remove``."""
        self.weight &= ~remove.unsqueeze(1)
        if self.bias is not None:
            self.bias &= ~remove


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


def live_channels(graph: ModelGraph, masks: dict[str, LayerMask], gates: dict[str, Tensor]) -> dict[str, Tensor]:
    """Forward propagation: per node, which output channels may carry a nonzero signal.

    ``gates`` maps node names to (C,) channel masks applied to that node's output.
    """
    live: dict[str, Tensor] = {}
    for name, rule in graph.rules.items():
        if rule.channels is None:
            continue
        if rule.rule is Rule.LAYER:
            value = masks[rule.layer].alive() if rule.layer in masks else torch.ones(rule.channels, dtype=torch.bool)
        elif rule.rule is Rule.PASS:
            value = live[rule.inputs[0]].clone() if rule.zero_preserving else torch.ones(rule.channels, dtype=torch.bool)
        elif rule.rule is Rule.FLATTEN:
            value = live[rule.inputs[0]].repeat_interleave(rule.spatial)
        elif rule.rule is Rule.MERGE:
            value = torch.zeros(rule.channels, dtype=torch.bool)
            for source in rule.inputs:
                value |= live[source]
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


def used_channels(graph: ModelGraph, masks: dict[str, LayerMask], gates: dict[str, Tensor]) -> dict[str, Tensor]:
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
            mark(rule.inputs[0], mask.weight.any(dim=0) if mask is not None else None)
        elif rule.rule in (Rule.PASS, Rule.MERGE):
            for source in rule.inputs:
                mark(source, out)
        elif rule.rule is Rule.FLATTEN:
            mark(rule.inputs[0], out.view(-1, rule.spatial).any(dim=1))
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


def clean(graph: ModelGraph, masks: dict[str, LayerMask], gates: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove neurons without outgoing connections and connections from removed channels,
    repeated to a fixpoint. Mutates ``masks``; returns the BatchNorm channel masks (by
    module name): a BatchNorm channel is kept while its input channel is live."""
    while True:
        changed = False
        live = live_channels(graph, masks, gates)
        for name, mask in masks.items():
            layer = graph.layers[name]
            if not layer.structured:
                continue
            cleared = mask.weight & live[layer.input_node].unsqueeze(0)
            if not torch.equal(cleared, mask.weight):
                mask.weight.copy_(cleared)
                changed = True
        used = used_channels(graph, masks, gates)
        for name, mask in masks.items():
            layer = graph.layers[name]
            if not layer.structured:
                continue
            before = mask.alive()
            mask.remove_neurons(~used[layer.node])
            changed |= not torch.equal(before, mask.alive())
        if not changed:
            break
    live = live_channels(graph, masks, gates)
    return {module: live[graph.rules[node].inputs[0]].clone() for node, module in graph.batchnorms.items()}
