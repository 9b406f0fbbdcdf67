"""L1-norm filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017) at
a given compute: the structured baseline of ``nnrelief compare --methods l1-filter``.

Which convs lose filters (:func:`filter_layers`): every conv (``groups`` 1) except the stem
(a conv reading the model input), whose output channels reach only other layers' inputs
through channel-wise ops (BatchNorm, zero-preserving activations, pooling, flatten). In the
zoo's residual nets (ResNets with option-A ``PadShortcut`` shortcuts) that is the first conv
of each residual block, the block's internal channels, as Li et al. prune them: the convs
writing into the residual stream (the stem, the second conv of each block) stay whole. In
VGG and plain conv nets it is every conv but the stem. Layers NNrelief's run spared
(``--ignore``/``--only``) are spared here too.

Removing filter j of a conv removes its kernels and bias, its BatchNorm channel (weight
and bias masked to 0, as :func:`nnrelief.prune` does) and the next layers' connections
from channel j (cleaning of :mod:`nnrelief.pruning.cleaning`). One fraction f is removed in every
such layer: of a layer's n filters (all, removed ones included) ``round(f n)``, at least
one kept, those of the smallest L1 norm among the filters still there. So pruning again
with a larger f removes further filters from an already pruned, retrained model.

f is found by bisection (:func:`bisect_fraction`) over the fractions at which some layer's
count changes (:func:`breakpoints`), so that the pruned model's MACs come closest to the
target; a uniform fraction moves in steps of whole filters, so the MACs reached are within
about one step of the target (see the report's ``macs`` setting). MACs are counted as the history's ``macs_sparse`` column: per
layer, output positions times nonzero weights (:func:`nnrelief.metrics.summarize`), so
they compare with NNrelief's; with whole filters and their input columns removed that equals
the dense MACs of the compacted model (:func:`nnrelief.compact`), as long as the kept
kernels hold no zero weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from fractions import Fraction

import torch
from torch import Tensor, nn

from ..analysis import ChannelGraph, Rule, analyse, weight_matrix
from ..analysis.layers import kernel_layout
from ..inputs import ModelInput
from ..metrics import effective_tensor, layer_macs
from ..pruning.apply import apply_layer_masks
from ..pruning.cleaning import LayerMask, clean
from ..pruning.masks import current_mask, gate_of
from ..pruning.report import PruneReport, build_report

__all__ = ["FilterPlan", "bisect_fraction", "breakpoints", "filter_l1_norms", "filter_layers", "l1_filter_prune", "removal_counts"]

logger = logging.getLogger(__name__)


def filter_l1_norms(weight: Tensor) -> Tensor:
    """(J,) the L1 norm of each filter's kernels, ``sum |w[j]|``."""
    return weight.detach().abs().flatten(1).sum(dim=1)


def removal_counts(fraction: Fraction, sizes: Sequence[int]) -> list[int]:
    """Filters to remove of layers of ``sizes`` filters: ``round(fraction * n)`` (halves up),
    at most ``n - 1`` (every layer keeps a filter). Exact for a :class:`~fractions.Fraction`."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return [min(math.floor(fraction * n + Fraction(1, 2)), n - 1) for n in sizes]


def breakpoints(sizes: Sequence[int]) -> list[Fraction]:
    """0 and every fraction at which :func:`removal_counts` of ``sizes`` changes, increasing:
    ``(k - 1/2) / n`` for k = 1 ... n - 1 of each size n."""
    return sorted({Fraction(0)} | {Fraction(2 * k - 1, 2 * n) for n in sizes for k in range(1, n)})


def bisect_fraction(cost: Callable[[Fraction], float], target: float, fractions: Sequence[Fraction]) -> Fraction:
    """Of the increasing ``fractions``, the one whose ``cost`` comes closest to ``target``.

    ``cost`` must not increase along ``fractions`` (e.g. :func:`breakpoints`, between which
    it is constant). Bisection finds the first fraction whose cost is at most ``target``;
    it and the fraction before are compared, the closer wins (the lower cost on a tie).
    At or above the first cost that is the first fraction, below the last cost the last.
    """
    if cost(fractions[0]) <= target:
        return fractions[0]
    if cost(fractions[-1]) > target:
        return fractions[-1]
    low, high = 0, len(fractions) - 1  # cost(fractions[low]) > target >= cost(fractions[high])
    while high - low > 1:
        middle = (low + high) // 2
        if cost(fractions[middle]) <= target:
            high = middle
        else:
            low = middle
    return fractions[low] if cost(fractions[low]) - target < target - cost(fractions[high]) else fractions[high]


def _users(graph: ChannelGraph) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for name, rule in graph.rules.items():
        for source in rule.inputs:
            users.setdefault(source, []).append(name)
    return users


def _reads_model_input(graph: ChannelGraph, node: str) -> bool:
    """Whether ``node`` depends on a model input through no prunable layer."""
    placeholders = {n.name for n in graph.capture.graph.nodes if n.op == "placeholder"}
    stack, seen = [node], set()
    while stack:
        name = stack.pop()
        if name in placeholders:
            return True
        if name in seen or graph.rules[name].rule is Rule.LAYER:
            continue
        seen.add(name)
        stack += graph.rules[name].inputs
    return False


def _feeds_layers_only(graph: ChannelGraph, users: dict[str, list[str]], node: str) -> bool:
    """Whether every path from ``node`` reaches a prunable layer's input through
    zero-preserving channel-wise ops and flattens only."""
    stack = [node]
    while stack:
        for user in users.get(stack.pop(), []):
            rule = graph.rules[user]
            if rule.rule is Rule.LAYER:
                continue
            if not (rule.rule is Rule.FLATTEN or (rule.rule is Rule.PASS and rule.zero_preserving)):
                return False
            stack.append(user)
    return True


def _filter_layers(graph: ChannelGraph) -> list[str]:
    users = _users(graph)
    return [
        name for name, layer in graph.layers.items()
        if layer.kind == "conv" and layer.structured and getattr(layer.module, "groups", 1) == 1
        and not any(_reads_model_input(graph, call.input_node) for call in layer.calls)
        and all(_feeds_layers_only(graph, users, call.node) for call in layer.calls)
    ]  # fmt: skip


def _graph(model: nn.Module, input_shape: tuple[int, ...]) -> ChannelGraph:
    weight = next(model.parameters())
    example = ModelInput((torch.zeros(2, *input_shape, device=weight.device, dtype=weight.dtype),))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        graph = analyse(model, example)
    finally:
        for module, training in modes.items():
            module.train(training)
    if not graph.traced:
        raise ValueError(f"l1-filter needs a model torch.export can capture; {type(model).__name__} is not ({graph.reason})")
    return graph


def _checked(names: list[str], model: nn.Module, spared: Collection[str] = ()) -> list[str]:
    if not names:
        also = f", other than the spared {', '.join(sorted(spared))}" if spared else ""
        raise ValueError(
            f"{type(model).__name__} has no conv layer whose filters L1-filter pruning can remove (convs other than "
            f"the stem whose channels feed only other layers{also}): it needs a conv net"
        )
    return names


def filter_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """The convs of ``model`` whose filters L1-filter pruning removes (see the module
    docstring); ``ValueError`` if there is none."""
    return _checked(_filter_layers(_graph(model, input_shape)), model)


def _connection_mask(module: nn.Module) -> LayerMask:
    """The current keep mask of a layer at connection level (one entry per kernel)."""
    weight = current_mask(module, "weight")
    weight = kernel_layout(module, weight)
    bias = current_mask(module, "bias")
    connections = weight.flatten(2).any(dim=2) if weight.dim() > 2 else weight.clone()
    return LayerMask(connections.cpu(), None if bias is None else bias.clone().cpu(), groups=getattr(module, "groups", 1))


def _kernel_nonzeros(module: nn.Module) -> Tensor:
    """(J, C) nonzero weights of each kernel (of each weight for a Linear layer)."""
    weight = effective_tensor(module, "weight")
    weight = kernel_layout(module, weight)
    nonzero = (weight != 0).long()
    return (nonzero.flatten(2).sum(dim=2) if nonzero.dim() > 2 else nonzero).cpu()


def _keep_largest(scores: Tensor, alive: Tensor, count: int) -> Tensor:
    """Keep mask of the ``count`` highest ``scores`` among ``alive`` (ties: the first)."""
    order = torch.sort(torch.where(alive, scores, torch.full_like(scores, -1.0)), descending=True, stable=True).indices
    keep = torch.zeros_like(alive)
    keep[order[: min(count, int(alive.sum()))]] = True
    return keep


class FilterPlan:
    """The candidate prunings of one model: per fraction, the layer and BatchNorm masks and
    their MACs (:meth:`masks`, :meth:`macs`), and applying one (:meth:`apply`).

    Args:
        model: the model (masked or not); not changed until :meth:`apply`.
        input_shape: one input's shape (no batch dimension), for tracing and MACs.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], spared: Collection[str] = ()) -> None:
        self.model, self.graph = model, _graph(model, input_shape)
        self.filters = _checked([name for name in _filter_layers(self.graph) if name not in spared], model, spared)
        layers = self.graph.layers
        self.base = {name: _connection_mask(layer.module) for name, layer in layers.items()}
        self.norms = {name: filter_l1_norms(effective_tensor(layers[name].module, "weight")).cpu() for name in self.filters}
        self.nonzeros = {name: _kernel_nonzeros(layer.module) for name, layer in layers.items()}
        modules = dict(model.named_modules())
        gates = {node: gate_of(modules[module]) for node, module in self.graph.gates.items()}
        self.gates = {node: gate.cpu() for node, gate in gates.items() if gate is not None}
        macs = layer_macs(model, input_shape)
        self.positions = {name: macs[name][0] // weight_matrix(layers[name].module).numel() for name in layers if name in macs}
        self.other_macs = sum(sparse for name, (_, sparse) in macs.items() if name not in self.positions)

    def sizes(self) -> list[int]:
        """All filters (removed ones included) of each filter layer."""
        return [self.base[name].weight.shape[0] for name in self.filters]

    def masks(self, fraction: Fraction) -> tuple[dict[str, LayerMask], dict[str, Tensor]]:
        """Layer masks and BatchNorm channel masks (by module name) after removing
        ``fraction`` of the filters of every filter layer."""
        masks = {name: LayerMask(m.weight.clone(), None if m.bias is None else m.bias.clone(), groups=m.groups)
                 for name, m in self.base.items()}  # fmt: skip
        sizes = self.sizes()
        for name, size, remove in zip(self.filters, sizes, removal_counts(fraction, sizes)):
            masks[name].remove_neurons(~_keep_largest(self.norms[name], masks[name].alive(), size - remove))
        return masks, clean(self.graph, masks, self.gates)

    def macs(self, masks: dict[str, LayerMask]) -> int:
        """The sparse MACs of the model under ``masks`` (as :func:`nnrelief.metrics.summarize` counts them)."""
        kept = sum(self.positions[name] * int((self.nonzeros[name] * masks[name].weight).sum()) for name in self.positions)
        return self.other_macs + kept

    def apply(self, masks: dict[str, LayerMask], batchnorms: dict[str, Tensor]) -> None:
        """Mask the model's layers and BatchNorms (ANDed with their masks: nothing revives)."""
        apply_layer_masks(self.model, masks, batchnorms)


def l1_filter_prune(
    model: nn.Module, target_macs: float, input_shape: tuple[int, ...], spared: Collection[str] = ()
) -> PruneReport:
    """Remove the same fraction of the smallest-L1 filters of every filter layer of ``model``
    (in place) but the ``spared`` ones, the fraction whose MACs come closest to
    ``target_macs`` (see the module docstring). The report's settings give the fraction, the
    target and the MACs reached."""
    plan = FilterPlan(model, input_shape, spared)
    cache: dict[Fraction, tuple[dict[str, LayerMask], dict[str, Tensor], int]] = {}

    def cost(fraction: Fraction) -> int:
        if fraction not in cache:
            masks, batchnorms = plan.masks(fraction)
            cache[fraction] = (masks, batchnorms, plan.macs(masks))
        return cache[fraction][2]

    candidates = breakpoints(plan.sizes())
    fraction = bisect_fraction(cost, target_macs, candidates)
    masks, batchnorms, macs = cache[fraction]
    if macs > target_macs and fraction == candidates[-1]:
        logger.warning("l1-filter: target %d MACs is below the fewest reachable, %d (one filter per layer left)",
                       target_macs, macs)  # fmt: skip
    plan.apply(masks, batchnorms)
    logger.info("l1-filter: %.4f of the filters of %d layers removed, %d MACs (target %d)",
                float(fraction), len(plan.filters), macs, target_macs)  # fmt: skip
    layers = ((name, layer.module) for name, layer in plan.graph.layers.items())
    return build_report(layers, method="l1-filter", fraction=float(fraction), target_macs=int(target_macs), macs=macs)
