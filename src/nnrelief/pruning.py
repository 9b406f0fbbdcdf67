"""One NNrelief pruning pass: statistics -> scores -> selection -> cleaning -> masks."""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from . import scores as score_fns
from .analysis import ChannelGraph, PrunableLayer, activity_key, analyse, input_key, map_key, weight_matrix
from .analysis.layers import kernel_layout, module_layout
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


def _select_all(
    model: nn.Module, layers: dict[str, PrunableLayer], stats: Statistics, mode: str, alpha_fc: float, alpha_conv: float
) -> dict[str, LayerMask]:
    masks = {}
    for layer in layers.values():
        weight = weight_matrix(layer.module).detach()
        contrib, bias_share = score_fns.contributions(layer.module, layer.kind, stats[input_key(layer.name)], mode, weight)
        alpha = alpha_fc if layer.kind == "linear" else alpha_conv
        keep_weight, keep_bias = select(contrib.cpu(), None if bias_share is None else bias_share.cpu(), alpha)
        old = _connection_mask(layer.module)
        shift = None
        if layer.batchnorm is not None:
            shift = batchnorm_constant(model.get_submodule(layer.batchnorm))
        masks[layer.name] = LayerMask(
            keep_weight & old.weight.cpu(), None if keep_bias is None else keep_bias & old.bias.cpu(), shift, old.groups
        )
    return masks


def _remove_dead(graph: ChannelGraph, stats: Statistics, masks: dict[str, LayerMask]) -> None:
    for layer in graph.layers.values():
        entry = stats.get(activity_key(layer.name))
        if entry is not None:
            masks[layer.name].remove_neurons(entry["activity"].cpu() == 0)


def _residual_rule(graph: ChannelGraph, stats: Statistics, masks: dict[str, LayerMask], gates: dict[str, Tensor], alpha: float) -> None:
    for join in graph.joins:
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


def _apply(model: nn.Module, graph: ChannelGraph, masks: dict[str, LayerMask], gates: dict[str, Tensor], bn_masks: dict[str, Tensor]) -> None:
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

    Under ``torchrun`` (a torch.distributed group of several processes) each process
    passes its own part of the pruning set: the statistics are summed over processes,
    and the masks are compared (by hash) before they are applied; ranks that disagree
    raise :class:`nnrelief.distributed.DistributedError`.
    """
    alpha_fc = check_alpha(alpha_fc, "alpha_fc")
    alpha_conv = check_alpha(alpha_conv, "alpha_conv")
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
        masks = _select_all(model, layers, stats, score, alpha_fc, alpha_conv)
        bn_masks: dict[str, Tensor] = {}
        gates: dict[str, Tensor] = {}
        if graph.traced:
            modules = dict(model.named_modules())
            for node, module_name in graph.gates.items():
                existing = gate_of(modules[module_name])
                gates[node] = existing.cpu() if existing is not None else torch.ones(graph.rules[node].channels, dtype=torch.bool)
            _remove_dead(graph, stats, masks)
            _residual_rule(graph, stats, masks, gates, alpha_conv)
            bn_masks = clean(graph, masks, gates)
        check_same_on_all_ranks(_flat(masks, gates, bn_masks), "pruning masks")  # torchrun
        _apply(model, graph, masks, gates, bn_masks)
        if graph.traced:
            analyse(model, first)  # new masks or gates changed the modules: the next pass finds the capture made
    finally:
        for module, training in modes.items():
            module.train(training)
    report = build_report(
        ((name, layer.module) for name, layer in layers.items()),
        alpha_fc=alpha_fc, alpha_conv=alpha_conv, score=score, samples=samples,
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
