"""One NNrelief pruning pass: statistics -> scores -> selection -> cleaning -> masks."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from . import scores as score_fns
from .analysis import ChannelGraph, PrunableLayer, activity_key, analyse, input_key, map_key, refresh, weight_matrix
from .analysis.layers import kernel_layout, module_layout
from .choices import Selector, alpha_for, check_alphas, check_selectors, check_target, find_alpha, spared_layers
from .cleaning import LayerMask, batchnorm_constant, clean, residual_decisions
from .diagnostics import FeedError, explain_run_failure, rejected_input, shape_text
from .distributed import check_same_on_all_ranks
from .inputs import ModelInput, batch_input
from .masks import current_mask, gate_of, model_weights, set_gate, set_mask
from .report import PruneReport, build_report
from .selection import check_alpha, select
from .stats import Statistics, all_reduce_statistics, collect

log = logging.getLogger(__name__)

SCORE_MODES = ("paper", "authors")


class _Inputs:
    """The pruning batches moved to the model's device, with one running record, kept on
    the device, of the first input tensor holding NaN or inf (read once after the pass: no
    host synchronisation per batch, and no per-batch tensor kept alive)."""

    def __init__(self, batches: Iterable[Any], device: torch.device) -> None:
        self.batches = batches
        self.device = device
        self.first_bad: Tensor | None = None
        self.where: list[tuple[int, tuple[int, ...]]] = []

    def __iter__(self) -> Iterator[ModelInput]:
        for index, batch in enumerate(self.batches):
            model_input = batch_input(batch, index).map(lambda tensor: tensor.to(self.device, non_blocking=True))
            for tensor in model_input.tensors():
                if tensor.is_floating_point():
                    # A float64 sum of finite entries is finite (short of float64's own range).
                    bad = ~torch.isfinite(tensor.sum(dtype=torch.float64))
                    if self.first_bad is None:
                        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
                    self.first_bad = torch.where(bad & (self.first_bad < 0), len(self.where), self.first_bad)
                    self.where.append((index, tuple(tensor.shape)))
            yield model_input

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming the first batch that held NaN or inf values."""
        first = -1 if self.first_bad is None else int(self.first_bad)
        if first >= 0:
            index, shape = self.where[first]
            raise ValueError(f"pruning batch {index} (shape {shape}) contains NaN or inf values; clean the data first")


def _connection_mask(module: nn.Module) -> LayerMask:
    weight = current_mask(module, "weight")
    weight = kernel_layout(module, weight)
    bias = current_mask(module, "bias")
    return LayerMask(
        weight.flatten(2).any(dim=2) if weight.dim() > 2 else weight.clone(),
        None if bias is None else bias.clone(),
        groups=getattr(module, "groups", 1),
    )


Contributions = dict[str, tuple[Tensor, Tensor | None]]
AlphaOf = Callable[[str, str], float]  # (layer name, kind) -> alpha


def _contributions(layers: dict[str, PrunableLayer], stats: Statistics, mode: str) -> Contributions:
    """(a_ij, bias share) of every layer, on the CPU: computed once, selected from as often as needed."""
    result = {}
    for layer in layers.values():
        weight = weight_matrix(layer.module).detach()
        contrib, bias_share = score_fns.contributions(layer.module, layer.kind, stats[input_key(layer.name)], mode, weight)
        result[layer.name] = (contrib.cpu(), None if bias_share is None else bias_share.cpu())
    return result


class _Planner:
    """The masks of one pass for given alphas (selection, then structure cleaning), and the
    remaining fraction they give; the statistics and contributions are computed once."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, layers: dict[str, PrunableLayer], stats: Statistics,
                 contributions: Contributions) -> None:  # fmt: skip
        self.model, self.graph, self.layers, self.stats, self.contributions = model, graph, layers, stats, contributions
        self.old = {name: _connection_mask(layer.module) for name, layer in layers.items()}
        self.shifts = {
            name: batchnorm_constant(model.get_submodule(layer.batchnorm)) for name, layer in layers.items() if layer.batchnorm
        }
        self.taps = {name: _kept_taps(layer.module) for name, layer in layers.items()}
        self.total = sum(current_mask(layer.module, "weight").numel() for layer in layers.values())
        self.total += sum(int(m.bias.numel()) for m in self.old.values() if m.bias is not None)
        modules = dict(model.named_modules())
        self.gates = {}
        for node, module_name in graph.gates.items():
            existing = gate_of(modules[module_name])
            self.gates[node] = existing.cpu() if existing is not None else torch.ones(graph.rules[node].channels, dtype=torch.bool)

    def masks(self, alpha_of: AlphaOf) -> tuple[dict[str, LayerMask], dict[str, Tensor], dict[str, Tensor]]:
        """(layer masks, shortcut gates, BatchNorm masks) of the pass."""
        masks = {}
        for name, layer in self.layers.items():
            contrib, bias_share = self.contributions[name]
            keep_weight, keep_bias = select(contrib, bias_share, alpha_of(name, layer.kind))
            old = self.old[name]
            masks[name] = LayerMask(
                keep_weight & old.weight.cpu(), None if keep_bias is None else keep_bias & old.bias.cpu(), self.shifts.get(name), old.groups
            )
        gates = {node: gate.clone() for node, gate in self.gates.items()}
        bn_masks: dict[str, Tensor] = {}
        if self.graph.traced:
            _remove_dead(self.graph, self.stats, masks)
            _residual_rule(self.graph, self.stats, masks, gates, lambda layer: alpha_of(layer, "conv"))
            bn_masks = clean(self.graph, masks, gates)
        return masks, gates, bn_masks

    def remaining(self, alpha_of: AlphaOf) -> float:
        """kept / total weights and biases of the layers under the pass's masks (as the report counts)."""
        masks, _, _ = self.masks(alpha_of)
        kept = sum(int((self.taps[name] * mask.weight).sum()) for name, mask in masks.items())
        kept += sum(int(mask.bias.sum()) for mask in masks.values() if mask.bias is not None)
        return kept / self.total if self.total else 1.0


def _kept_taps(module: nn.Module) -> Tensor:
    """Per connection (kernel), how many of its weight entries are still kept: (J, C/g) int."""
    weight = kernel_layout(module, current_mask(module, "weight"))
    return weight.flatten(2).sum(dim=2).cpu() if weight.dim() > 2 else weight.long().cpu()


def _remove_dead(graph: ChannelGraph, stats: Statistics, masks: dict[str, LayerMask]) -> None:
    for name, mask in masks.items():
        entry = stats.get(activity_key(name))
        if entry is not None:
            mask.remove_neurons(entry["activity"].cpu() == 0)


def _residual_rule(
    graph: ChannelGraph, stats: Statistics, masks: dict[str, LayerMask], gates: dict[str, Tensor], alpha_of: Callable[[str], float]
) -> None:
    for join in graph.joins:
        if join.layer not in masks:
            continue  # a spared branch keeps its filters; its shortcut is left alone too
        alpha = alpha_of(join.layer)
        branch, shortcut = stats[map_key(join.branch)], stats[map_key(join.shortcut)]
        prune_branch, mask_shortcut = residual_decisions(
            (branch["abs_map"].double() / float(branch["count"])).float().cpu(),
            (shortcut["abs_map"].double() / float(shortcut["count"])).float().cpu(),
            alpha,
        )
        masks[join.layer].remove_neurons(prune_branch)
        if join.gate_module is not None:
            gates[join.shortcut] = gates[join.shortcut] & ~mask_shortcut


def _flat(masks: dict[str, LayerMask], gates: dict[str, Tensor], bn_masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every mask :func:`_apply` applies, by name (to compare them across processes)."""
    flat = {f"gate:{name}": gate for name, gate in gates.items()}
    flat.update({f"bn:{name}": keep for name, keep in bn_masks.items()})
    for name, mask in masks.items():
        flat[f"weight:{name}"] = mask.weight
        if mask.bias is not None:
            flat[f"bias:{name}"] = mask.bias
    return flat


def apply_layer_masks(model: nn.Module, masks: dict[str, LayerMask], bn_masks: dict[str, Tensor]) -> None:
    """Mask layers (connection-level masks expanded to whole kernels) and BatchNorm channels
    of ``model``, ANDed with their existing masks: nothing revives."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules[name]
        shape = weight_matrix(module).shape
        weight = mask.weight.view(shape[0], shape[1], *([1] * (len(shape) - 2))).expand(shape)
        set_mask(module, "weight", module_layout(module, weight))
        if mask.bias is not None:
            set_mask(module, "bias", mask.bias)
    for name, keep in bn_masks.items():
        if not bool(keep.all()) or getattr(modules[name], "weight_mask", None) is not None:
            set_mask(modules[name], "weight", keep)
            set_mask(modules[name], "bias", keep)


def _apply(model: nn.Module, graph: ChannelGraph, masks: dict[str, LayerMask], gates: dict[str, Tensor], bn_masks: dict[str, Tensor]) -> None:
    apply_layer_masks(model, masks, bn_masks)
    modules = dict(model.named_modules())
    for node, module_name in graph.gates.items():
        if not bool(gates[node].all()):
            set_gate(modules[module_name], gates[node], model_weights(model))


def prune(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    alpha_fc: float = 0.95,
    alpha_conv: float = 0.9,
    score: str = "paper",
    progress: bool = True,
    ignore: Iterable[Selector] | Selector | None = None,
    only: Iterable[Selector] | Selector | None = None,
    alphas: Mapping[str, float] | None = None,
    target: float | None = None,
) -> PruneReport:
    """Run one NNrelief pruning pass on ``model`` in place.

    ``batches`` is any iterable of input tensors, dicts of keyword inputs (called as
    ``model(**batch)``, e.g. Hugging Face batches) or (inputs, target) pairs whose inputs are a
    tensor, a tuple of positional inputs or a dict (a DataLoader works): the pruning set,
    streamed once. Every Linear (and GPT-2 ``Conv1D``) and Conv2d layer is scored on its own
    input (for token sequences, mean |x| over samples and token positions); per
    neuron/filter the connections (kernels for conv) and the bias carrying a fraction
    ``alpha_fc`` / ``alpha_conv`` of its signal are kept; dead neurons, neurons
    without outgoing connections and weak residual branches/shortcuts are removed. Masks
    are PyTorch pruning masks (``weight_orig``/``weight_mask``), so training keeps them.

    ``score="paper"`` uses the paper's conv formula (mean over samples of per-sample
    Frobenius norms); ``score="authors"`` the authors' code (norm of the mean |input|).
    The model's train/eval mode and requires_grad flags are left as they were.

    Choices (as in ``torch.nn.utils.prune`` / Torch-Pruning / NNI): ``ignore`` spares layers
    (name glob patterns such as ``"features.0"`` or ``"*.classifier"``, or module types),
    ``only`` prunes just the matching layers; a spared layer keeps every weight, and so keeps
    its producers' channels in use, and is listed in ``report.skipped``. ``alphas`` maps name
    patterns to a layer's alpha (the first match wins; others use ``alpha_fc`` /
    ``alpha_conv``). ``target`` is the remaining fraction of the scored layers' weights and
    biases to reach (as ``report.remaining_fraction`` counts it): one alpha for every layer,
    found from the pass's own statistics by bisection (no second pass), is used and reported
    as ``report.settings["alpha"]``; passing it back as ``alpha_fc`` and ``alpha_conv``
    gives the same masks.

    Under ``torchrun`` (a torch.distributed group of several processes) each process
    passes its own part of the pruning set: the statistics are summed over processes,
    and the masks are compared (by hash) before they are applied; ranks that disagree
    raise :class:`nnrelief.distributed.DistributedError`.
    """
    alpha_fc = check_alpha(alpha_fc, "alpha_fc")
    alpha_conv = check_alpha(alpha_conv, "alpha_conv")
    ignore, only = check_selectors(ignore, "ignore"), check_selectors(only, "only")
    alphas, target = check_alphas(alphas), check_target(target)
    if score not in SCORE_MODES:
        raise ValueError(f"score must be one of {SCORE_MODES}, got {score!r}")
    _check_finite(model)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        inputs = _Inputs(batches, device)
        stream = iter(inputs)
        first = next(stream, None)
        if first is None:
            raise ValueError("no pruning batches: pass a non-empty iterable of inputs (e.g. 1,000 training samples)")
        graph = _analyse(model, first)
        total = len(batches) if hasattr(batches, "__len__") else None
        feed = tqdm(itertools.chain([first], stream), total=total, desc="nnrelief pass", unit="batch",
                    disable=None if progress else True, leave=False)  # fmt: skip
        stats = _run(model, graph, feed, score)
        inputs.check_finite()
        all_reduce_statistics(stats)
        layers, skipped = _layers_that_ran(graph, stats)
        samples = _sample_count(model, layers, stats)
        layers = _unspared(model, layers, skipped, ignore, only)
        planner = _Planner(model, graph, layers, stats, _contributions(layers, stats, score))
        found = None if target is None else find_alpha(lambda alpha: planner.remaining(lambda _name, _kind: alpha), target)
        if found is None:
            masks, gates, bn_masks = planner.masks(lambda name, kind: alpha_for(name, kind, alphas, alpha_fc, alpha_conv))
        else:
            masks, gates, bn_masks = planner.masks(lambda _name, _kind: found)
        check_same_on_all_ranks(_flat(masks, gates, bn_masks), "pruning masks")  # torchrun
        _apply(model, graph, masks, gates, bn_masks)
        if graph.traced:
            refresh(model, first, graph)  # new masks or gates changed the modules: the next pass finds them captured
    finally:
        for module, training in modes.items():
            module.train(training)
    choices = {"alphas": dict(alphas)} if alphas else {}
    if target is not None:
        choices.update(target=target, alpha=found)
    report = build_report(
        ((name, layer.module) for name, layer in layers.items()),
        alpha_fc=alpha_fc, alpha_conv=alpha_conv, score=score, samples=samples, **choices,
    )
    report.skipped = skipped
    report.analysis = "channel graph" if graph.traced else f"connection level: {graph.reason}"
    if report.kept == 0:
        log.warning(
            "nnrelief pass removed every weight and bias of %s: the model now outputs a constant. "
            "Check the pruning batches (are they all zero?) or raise alpha_fc/alpha_conv", type(model).__name__,
        )  # fmt: skip
    log.info("nnrelief pass: %d / %d weights and biases remain (%.2fx)", report.kept, report.total, report.compression)
    return report


def _check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN/inf parameters or buffers (a diverged training), naming them."""
    named = [(name, t) for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_floating_point()]
    if not named:
        return
    checks = [t.detach().isfinite().all() for _, t in named]
    one_device = len({check.device for check in checks}) == 1
    finite = torch.stack(checks).tolist() if one_device else [bool(check) for check in checks]  # one host sync
    bad = [name.replace("_orig", "") for (name, _), ok in zip(named, finite) if not ok]
    if bad:
        raise ValueError(
            f"{type(model).__name__} has NaN or inf values in {', '.join(bad)}; the model was left unchanged. "
            "Its training probably diverged: prune a model with finite weights (an earlier checkpoint, "
            "or retrain with a lower learning rate)"
        )


def _analyse(model: nn.Module, first: ModelInput) -> ChannelGraph:
    graph = analyse(model, first)
    rejected = None if graph.traced else rejected_input(model, first)
    if rejected is not None:
        raise rejected
    if not graph.layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer that NNrelief can prune")
    return graph


def _layers_that_ran(graph: ChannelGraph, stats: Statistics) -> tuple[dict[str, PrunableLayer], dict[str, str]]:
    """The layers with input statistics (all of them when captured), and the skipped ones."""
    skipped = dict(graph.skipped)
    missing = [name for name in graph.layers if input_key(name) not in stats]
    if not missing:
        return graph.layers, skipped
    for name in missing:
        skipped[name] = "never ran on the pruning batches (an unused head, or its weight read by other code)"
    return {name: layer for name, layer in graph.layers.items() if name not in missing}, skipped


def _unspared(
    model: nn.Module, layers: dict[str, PrunableLayer], skipped: dict[str, str], ignore: list[Selector], only: list[Selector]
) -> dict[str, PrunableLayer]:
    """The layers the pass prunes; the spared ones are added to ``skipped``."""
    spared = spared_layers({name: layer.module for name, layer in layers.items()}, ignore, only)
    if spared and len(spared) == len(layers):
        raise ValueError(f"ignore=/only= spare every layer of {type(model).__name__} ({', '.join(sorted(spared))}): nothing to prune")
    for name in sorted(spared):
        skipped[name] = "spared by ignore=/only=: every weight kept"
    return {name: layer for name, layer in layers.items() if name not in spared}


def _sample_count(model: nn.Module, layers: dict[str, PrunableLayer], stats: Statistics) -> int:
    """Samples the first layer saw; refuses a pass over no samples (the model is untouched)."""
    if not layers:
        raise ValueError(f"no Linear or Conv2d layer of {type(model).__name__} ran on the pruning batches")
    samples = int(stats[input_key(next(iter(layers)))]["count"])
    if samples == 0:
        raise ValueError("the pruning batches hold no samples (every batch is empty); the model was left unchanged")
    return samples


def _run(model: nn.Module, graph: ChannelGraph, feed: Iterable[ModelInput], mode: str) -> Statistics:
    position: dict[str, Any] = {"index": 0, "shape": None}

    def tracked() -> Iterator[ModelInput]:
        batches = iter(feed)
        for index in itertools.count():
            try:
                x = next(batches)
            except StopIteration:
                return
            except Exception as error:
                raise FeedError() from error
            position["index"], position["shape"] = index, shape_text(x)
            yield x

    try:
        return collect(graph, tracked(), mode, model)
    except FeedError as error:
        raise error.__cause__ from None
    except (ValueError, TypeError):
        raise
    except Exception as error:
        raise explain_run_failure(position["index"], position["shape"], error) from error
