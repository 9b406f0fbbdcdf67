"""One NNrelief pruning pass, :func:`prune`, stage by stage:

inputs (:mod:`.batches`: batches moved to the model's device, non-finite inputs and
parameters refused) -> graph (:mod:`nnrelief.analysis`: the cached channel graph) ->
statistics (:mod:`.stats`, streamed once over the batches) -> scores, selection and
cleaning (:mod:`.plan`, on :mod:`.scores`, :mod:`.selection`, :mod:`.cleaning`) -> masks
(:mod:`.apply`, held by :mod:`.masks`). What went wrong in a user's model or batches is
explained by :mod:`.diagnostics`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..analysis import ChannelGraph, PrunableLayer, analyse, input_key, refresh
from ..compaction.compactor import compacted_widths
from ..distributed import check_same_on_all_ranks
from ..heap import release_freed_memory
from ..inputs import ModelInput
from ..kinds import scored_kinds
from .apply import apply_pass_masks, flat_masks
from .batches import PruningBatches, check_finite_model
from .choices import Selector, UnreachableTargetError, check_choices_match, find_alpha, spared_layers
from .diagnostics import FeedError, explain_run_failure, rejected_input, shape_text
from .nm import misfits_text, nm_misfits
from .pass_settings import DEFAULTS, SCORE_MODES, PassSettings
from .plan import Planner
from .report import PruneReport, build_report
from .stats import Statistics, all_reduce_statistics, collect

__all__ = ["SCORE_MODES", "SPARED", "prune"]

log = logging.getLogger(__name__)

SPARED = "spared by ignore=/only=: every weight kept"  # report.skipped's reason for a spared layer


def prune(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    alpha_fc: float = DEFAULTS.alpha_fc,
    alpha_conv: float = DEFAULTS.alpha_conv,
    score: str = DEFAULTS.score,
    progress: bool = True,
    ignore: Iterable[Selector] | Selector | None = None,
    only: Iterable[Selector] | Selector | None = None,
    alphas: Mapping[str, float] | None = None,
    target: float | None = None,
    nm: tuple[int, int] | None = None,
    target_scope: str = DEFAULTS.target_scope,
    skip_padding: bool = DEFAULTS.skip_padding,
) -> PruneReport:
    """Run one NNrelief pruning pass on ``model`` in place.

    ``batches`` is any iterable of input tensors, dicts of keyword inputs (called as
    ``model(**batch)``, e.g. Hugging Face batches) or (inputs, target) pairs whose inputs are a
    tensor, a tuple of positional inputs or a dict (a DataLoader works): the pruning set,
    streamed once. Every layer of a kind of :mod:`nnrelief.kinds` (Linear, GPT-2 ``Conv1D``,
    Conv1d/2d/3d, ConvTranspose1d/2d/3d) is scored on its own
    input (for token sequences, mean |x| over samples and token positions: with
    ``skip_padding``, the default, a batch holding an ``attention_mask`` (B, T) counts only
    its real tokens, here and in the activity that finds dead neurons); per
    neuron/filter the connections (kernels for conv) and the bias carrying a fraction
    ``alpha_fc`` / ``alpha_conv`` of its signal are kept; dead neurons, neurons
    without outgoing connections and weak residual branches/shortcuts are removed. Pruned
    weights are zeroed in place and held at zero through training by byte masks
    (:mod:`nnrelief.pruning.masks`).

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
    gives the same masks. With ``target_scope="layer"`` every layer gets its own alpha,
    found so that its own selection reaches ``target`` (the per-neuron alpha rule inside a
    layer budget, as Wanda gives every layer the same sparsity; ``report.settings["alphas_found"]``);
    structure cleaning may then remove a little more. ``target`` is a fraction of the dense layers: one above what they
    still keep raises :class:`~nnrelief.choices.UnreachableTargetError` (a ``ValueError``;
    the model is left unchanged), one the pass cannot come within 10% of is logged as a
    warning. A pattern of ``ignore``/``only``/``alphas`` that matches no prunable layer, or a
    type the model does not contain, raises ``ValueError`` naming it.

    ``nm=(n, m)`` (e.g. ``(2, 4)``) replaces the alpha rule by N:M sparsity: per neuron, each
    group of m consecutive inputs keeps its n connections of highest score (per filter, n of
    every m consecutive input channels' kernels); structure cleaning still follows and only
    removes more. A pruned layer whose inputs (conv: input channels per group) do not split
    into groups of m raises ``ValueError`` naming it before anything changes (spare it with
    ``ignore``); ``nm`` with ``target``, ``alphas`` or other alphas raises ``ValueError``.

    Under ``torchrun`` (a torch.distributed group of several processes) each process
    passes its own part of the pruning set: the statistics are summed over processes,
    and the masks are compared (by hash) before they are applied; ranks that disagree
    raise :class:`nnrelief.distributed.DistributedError`.

    The keywords but ``progress`` are the fields of :class:`~nnrelief.pruning.pass_settings.PassSettings`
    (checked and defaulted there).
    """
    settings = PassSettings(alpha_fc=alpha_fc, alpha_conv=alpha_conv, score=score, ignore=ignore, only=only, alphas=alphas,
                            target=target, target_scope=target_scope, nm=nm, skip_padding=skip_padding)  # fmt: skip
    target = settings.target
    if isinstance(batches, torch.Tensor):
        raise TypeError(f"batches is one tensor of shape {tuple(batches.shape)}, and iterating it gives single samples: "
                        "pass a list of batches, [x] (one batch) or x.split(n) (batches of n samples)")  # fmt: skip
    check_finite_model(model)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        inputs = PruningBatches(batches, device)
        stream = iter(inputs)
        first = next(stream, None)
        if first is None:
            raise ValueError("no pruning batches: pass a non-empty iterable of inputs (e.g. 1,000 training samples)")
        graph = _analyse(model, first, dynamic=not inputs.one_signature())
        check_choices_match(model, [*graph.layers, *graph.skipped], list(settings.ignore), list(settings.only), settings.alphas)
        if settings.nm is not None:
            _check_nm_widths(graph, settings)
        total = len(batches) if hasattr(batches, "__len__") else None
        feed = tqdm(itertools.chain([first], stream), total=total, desc="nnrelief pass", unit="batch",
                    disable=None if progress else True, leave=False)  # fmt: skip
        stats = _run(model, graph, feed, settings.score, settings.skip_padding)
        release_freed_memory()  # what the forwards freed, before the masks are allocated
        inputs.check_finite()
        all_reduce_statistics(stats)
        layers, skipped = _layers_that_ran(graph, stats)
        samples = _sample_count(model, layers, stats)
        layers = _unspared(model, layers, skipped, list(settings.ignore), list(settings.only))
        planner = Planner(model, graph, layers, stats, settings.score, settings.nm)
        found: float | dict[str, float] | None = None
        if target is None:
            masks, gates, bn_masks = planner.masks(settings.alpha_of)
        elif settings.target_scope == "layer":
            found = _alphas_per_layer(planner, target)
            masks, gates, bn_masks = planner.masks(lambda name, _kind: found.get(name, 1.0))
        else:
            found = _alpha_for_target(planner, target)
            masks, gates, bn_masks = planner.masks(lambda _name, _kind: found)
        check_same_on_all_ranks(flat_masks(masks, gates, bn_masks), "pruning masks")  # torchrun
        apply_pass_masks(model, graph, masks, gates, bn_masks)
        widths = None
        if graph.traced:
            graph = refresh(model, first, graph)  # new masks or gates changed the modules: the next pass finds them captured
            widths = compacted_widths(model, graph)
    finally:
        for module, training in modes.items():
            module.train(training)
        release_freed_memory()
    choices = {"alphas": dict(settings.alphas)} if settings.alphas else {}
    if isinstance(found, dict):
        choices.update(target=target, target_scope="layer", alphas_found=found)
    elif target is not None:
        choices.update(target=target, alpha=found)
    if settings.nm is not None:
        choices.update(nm=settings.nm)
    report = build_report(
        ((name, layer.module) for name, layer in layers.items()), widths,
        alpha_fc=settings.alpha_fc,
        alpha_conv=settings.alpha_conv,
        score=settings.score,
        samples=samples,
        **choices,
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


def _alpha_for_target(planner: Planner, target: float) -> float:
    """The one alpha whose masks come closest to ``target``; a target above what the layers
    still hold is refused (a pass never restores weights), one this pass cannot come near
    (cleaning keeps or removes more) is logged as a warning."""
    now = planner.current()
    if target > now + 1e-9:
        raise UnreachableTargetError(target, now)
    found = find_alpha(lambda alpha: planner.remaining(lambda _name, _kind: alpha), target)
    reached = planner.remaining(lambda _name, _kind: found)
    if abs(reached - target) > 0.1 * target:
        log.warning("target=%g: the nearest this pass reaches is %.4g (alpha %.4g); structure cleaning sets the rest",
                    target, reached, found)  # fmt: skip
    return found


def _check_nm_widths(graph: ChannelGraph, settings: PassSettings) -> None:
    """Under ``nm``, refuse the layers the pass would prune whose inputs do not split into groups of m."""
    modules = {name: layer.module for name, layer in graph.layers.items()}
    spared = spared_layers(modules, list(settings.ignore), list(settings.only))
    misfits = nm_misfits({name: module for name, module in modules.items() if name not in spared}, settings.nm[1])
    if misfits:
        raise ValueError(f"nm={settings.nm} groups the inputs of every pruned layer (conv: input channels per group) by "
                         f"{settings.nm[1]}; {misfits_text(misfits)} do not split so: spare them with "
                         f"ignore={[*settings.ignore, *misfits]!r}")  # fmt: skip


def _alphas_per_layer(planner: Planner, target: float, rounds: int = 6) -> dict[str, float]:
    """Per layer the alpha that brings it, after structure cleaning, closest to ``target``.
    Cleaning couples the layers (it removes what other layers no longer use; the residual
    rule drops weak branches), so each layer's own selection aims off ``target`` by the
    ratio it missed (at most 2x per round) for a few rounds, and the round that came
    closest over all layers is kept. A layer already at or below ``target`` keeps what it
    has (alpha 1)."""
    aims = {name: target for name in planner.layers if planner.layer_current(name) > target + 1e-9}
    best, best_miss = dict.fromkeys(planner.layers, 1.0), float("inf")
    for _ in range(rounds):
        found = dict.fromkeys(planner.layers, 1.0)
        for name, aim in aims.items():
            found[name] = find_alpha(lambda alpha, name=name: planner.layer_remaining(name, alpha), aim)
        masks, _, _ = planner.masks(lambda name, _kind, found=found: found[name])
        reached = {name: count / planner.layer_total(name) for name, count in planner.kept_counts(masks).items()}
        miss = sum(abs(reached[name] - target) * planner.layer_total(name) for name in aims)
        if miss < best_miss:
            best, best_miss = found, miss
        if all(abs(reached[name] - target) <= 0.005 * target for name in aims):
            break
        aims = {name: min(1.0, aim * min(2.0, max(0.5, target / max(reached[name], 1e-12)))) for name, aim in aims.items()}
    return best


def _analyse(model: nn.Module, first: ModelInput, dynamic: bool) -> ChannelGraph:
    graph = analyse(model, first, dynamic)
    rejected = None if graph.traced else rejected_input(model, first)
    if rejected is not None:
        raise rejected
    if not graph.layers:
        raise ValueError(f"{type(model).__name__} has no layer that NNrelief can prune ({scored_kinds()})")
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
        skipped[name] = SPARED
    return {name: layer for name, layer in layers.items() if name not in spared}


def _sample_count(model: nn.Module, layers: dict[str, PrunableLayer], stats: Statistics) -> int:
    """Samples the first layer saw; refuses a pass over no samples (the model is untouched)."""
    if not layers:
        raise ValueError(f"no layer of {type(model).__name__} that NNrelief prunes ({scored_kinds()}) ran on the pruning batches")
    samples = int(stats[input_key(next(iter(layers)))]["count"])
    if samples == 0:
        raise ValueError("the pruning batches hold no samples (every batch is empty); the model was left unchanged")
    return samples


def _run(model: nn.Module, graph: ChannelGraph, feed: Iterable[ModelInput], mode: str, skip_padding: bool) -> Statistics:
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
        return collect(graph, tracked(), mode, model, skip_padding)
    except FeedError as error:
        raise error.__cause__ from None
    except (ValueError, TypeError):
        raise
    except Exception as error:
        raise explain_run_failure(position["index"], position["shape"], error) from error
