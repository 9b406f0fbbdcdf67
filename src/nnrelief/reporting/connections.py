"""Figure 2 of the paper: the network before and after pruning, neurons as dots per layer
and connections coloured by their NNrelief importance ``s_ij = a_ij / S_j``, next to a heat
map of the input pixels' total importance for layer 1 (:func:`plot_connections`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import data as nndata
from ..analysis import analyse, input_key
from ..experiments.config import ExperimentConfig, derive_seed
from ..inputs import ModelInput
from ..pruning import scores as score_fns
from ..pruning.masks import current_mask
from ..pruning.stats import collect
from .figures import pyplot, save

REMOVED_COLOR = "#b0b0b0"  # connections pruning removed


@dataclass
class ConnectionScores:
    """NNrelief importance of every connection of one layer (of a kind of :mod:`nnrelief.kinds`).

    Attributes:
        name: the layer's qualified name.
        kind: ``linear`` or ``conv``.
        scores: (J, I) relative scores ``s_ij = a_ij / S_j`` (a conv connection is a whole
            kernel; pruned connections score 0).
        bias_scores: (J,) bias scores, or ``None``.
        alive: (J, I) connections still kept.
        neuron_alive: (J,) neurons/filters with a kept connection or bias.
    """

    name: str
    kind: str
    scores: Tensor
    bias_scores: Tensor | None
    alive: Tensor
    neuron_alive: Tensor


def pruning_inputs(cfg: ExperimentConfig, samples: int, data_dir: str | None = None) -> Tensor:
    """``samples`` normalised training images of a run's dataset (validation split
    excluded, drawn with the run's seed), as one batch."""
    folder = data_dir if data_dir is not None else cfg.data_dir
    full = nndata.load_dataset(cfg.dataset, folder, "train")
    train, _ = nndata.train_val_split(full, cfg.val_size, seed=cfg.seed)
    chosen = nndata.sample_pruning_set(train, min(samples, len(train)), seed=derive_seed(cfg.seed, "prune", 1))
    loader = nndata.BatchLoader(chosen, len(chosen), shuffle=False, seed=0)
    return next(iter(loader))[0]


@torch.no_grad()
def connection_scores(model: nn.Module, inputs: Tensor, score: str = "paper") -> list[ConnectionScores]:
    """The relative scores of every prunable layer on ``inputs`` (one batch).

    The statistics and contributions are those of a pruning pass (:func:`nnrelief.pruning.stats.collect`,
    :func:`nnrelief.pruning.scores.contributions`); ``score="authors"`` uses the authors' conv variant.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        graph = analyse(model, ModelInput((inputs,)))
        stats = collect(graph, [ModelInput((inputs,))], score, model)
    finally:
        for module, training in modes.items():
            module.train(training)
    result = []
    for name, layer in graph.layers.items():
        module = layer.module
        contrib, bias = score_fns.contributions(module, layer.kind, stats[input_key(name)], score)
        relative, bias_relative = score_fns.relative_scores(contrib, bias)
        weight_mask = current_mask(module, "weight")
        alive = weight_mask.flatten(2).any(2) if weight_mask.dim() > 2 else weight_mask
        neuron_alive = alive.any(1)
        bias_mask = current_mask(module, "bias")
        if bias_mask is not None:
            neuron_alive = neuron_alive | bias_mask
        result.append(ConnectionScores(name, layer.kind, relative.cpu(), None if bias_relative is None else bias_relative.cpu(),
                                       alive.cpu(), neuron_alive.cpu()))  # fmt: skip
    return result


def _chain(layers: Sequence[ConnectionScores]) -> list[tuple[Tensor, Tensor]]:
    """(scores, alive) per layer with inputs grouped onto the previous layer's neurons
    (a conv channel feeds a block of flattened FC inputs); raises if not a chain."""
    chain = []
    for index, layer in enumerate(layers):
        scores, alive = layer.scores, layer.alive
        if index:
            upstream = layers[index - 1].scores.shape[0]
            inputs = scores.shape[1]
            if inputs % upstream:
                raise ValueError(
                    f"layer {layer.name} has {inputs} inputs, not a multiple of the {upstream} outputs of "
                    f"{layers[index - 1].name}: the layers do not form a chain"
                )
            group = inputs // upstream
            scores = scores.view(-1, upstream, group).sum(2)
            alive = alive.view(-1, upstream, group).any(2)
        chain.append((scores, alive))
    return chain


def _select_nodes(
    dense: list[tuple[Tensor, Tensor]], final: list[tuple[Tensor, Tensor]], max_nodes: int
) -> list[Tensor]:
    """Indices of the nodes drawn per column: all if at most ``max_nodes``, else
    ``max_nodes`` at evenly spaced ranks of the connections each has left after pruning
    (from most to none; ties: higher total score in the dense model), in index order, so
    that the drawn nodes lose as much to pruning as the layer does."""
    columns = len(dense) + 1
    sizes = [dense[0][0].shape[1]] + [scores.shape[0] for scores, _ in dense]
    chosen = []
    for column in range(columns):
        if sizes[column] <= max_nodes:
            chosen.append(torch.arange(sizes[column]))
            continue
        count = torch.zeros(sizes[column])
        weight = torch.zeros(sizes[column])
        if column < len(dense):  # outgoing connections
            count += final[column][1].sum(0).float()
            weight += dense[column][0].sum(0)
        if column > 0:  # incoming connections
            count += final[column - 1][1].sum(1).float()
            weight += dense[column - 1][0].sum(1)
        rank = count + weight / (weight.max() + 1e-12) * 0.5  # score only breaks ties
        order = rank.argsort(descending=True)
        picks = torch.linspace(0, sizes[column] - 1, max_nodes).round().long()
        chosen.append(order[picks].sort().values)
    return chosen


def _segments(
    chain: list[tuple[Tensor, Tensor]], before: list[tuple[Tensor, Tensor]], nodes: list[Tensor], ys: list[list[float]],
) -> tuple[list[Any], list[float], list[Any]]:  # fmt: skip
    """Lines between the drawn nodes: the connections alive in ``chain`` with their scores,
    and those alive in ``before`` (the dense model) but not in ``chain``: removed."""
    kept, values, removed = [], [], []
    for c, ((scores, alive), (_, alive_before)) in enumerate(zip(chain, before)):
        for a, j in enumerate(nodes[c + 1].tolist()):
            for b, i in enumerate(nodes[c].tolist()):
                segment = ((c, ys[c][b]), (c + 1, ys[c + 1][a]))
                if alive[j, i]:
                    kept.append(segment)
                    values.append(float(scores[j, i]))
                elif alive_before[j, i]:
                    removed.append(segment)
    return kept, values, removed


def plot_connections(
    dense: Sequence[ConnectionScores],
    final: Sequence[ConnectionScores],
    path: str | os.PathLike[str],
    *,
    titles: tuple[str, str] = ("dense", "pruned"),
    input_shape: tuple[int, ...] | None = None,
    max_nodes: int = 12,
) -> str:
    """Draw the connection picture (paper, Figure 2) of ``dense`` and ``final`` scores.

    Neurons are dots per layer (hollow grey: removed); each connection is a line coloured
    by its relative score ``s_ij`` (log colour scale shared by both rows); in the pruned row
    the connections pruning removed are dotted grey lines. Layers wider than ``max_nodes``
    show ``max_nodes`` neurons, the same in both rows, at evenly spaced ranks of their
    connections left after pruning (:func:`_select_nodes`). If the first layer is fully connected on a one-channel image
    (``input_shape`` = (1, H, W)), a heat map of each pixel's total score sum_j s_ij is
    drawn alongside; grey pixels have no connection left. Conv layers count a kernel as
    one connection; an FC layer after a conv gets its inputs summed per channel.

    Returns:
        A caption describing what is shown.
    """
    plt = pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm

    chains = [_chain(dense), _chain(final)]
    nodes = _select_nodes(chains[0], chains[1], max_nodes)
    sizes = [dense[0].scores.shape[1]] + [layer.scores.shape[0] for layer in dense]
    first = dense[0]
    heatmap = (
        first.kind == "linear" and input_shape is not None and len(input_shape) == 3
        and input_shape[0] == 1 and math.prod(input_shape) == first.scores.shape[1]
    )  # fmt: skip

    drawn = torch.cat([
        scores[nodes[c + 1]][:, nodes[c]][alive[nodes[c + 1]][:, nodes[c]]]
        for chain in chains for c, (scores, alive) in enumerate(chain)
    ])  # fmt: skip
    positive = drawn[drawn > 0]
    vmax = float(positive.max()) if positive.numel() else 1.0
    vmin = max(float(positive.quantile(0.02)) if positive.numel() else vmax / 1e3, vmax / 1e4)
    norm = LogNorm(vmin=vmin, vmax=vmax, clip=True)
    cmap = plt.get_cmap("viridis")

    fig = plt.figure(figsize=(13 if heatmap else 10, 9.5), layout="constrained")
    grid = fig.add_gridspec(2, 2 if heatmap else 1, width_ratios=[2.4, 1] if heatmap else None)
    graph_axes = []
    pixel_images = []
    for row, (layers, chain, title) in enumerate(zip((dense, final), chains, titles)):
        ax = fig.add_subplot(grid[row, 0])
        graph_axes.append(ax)
        neuron_alive = [chain[0][1].any(0)] + [layer.neuron_alive for layer in layers]
        ys = [_spread(len(column)) for column in nodes]
        segments, values, removed = _segments(chain, chains[0], nodes, ys)
        values = [max(value, vmin) for value in values]
        ax.add_collection(LineCollection(removed, colors=[REMOVED_COLOR], linewidths=0.4, linestyles="dotted"))
        order = sorted(range(len(values)), key=values.__getitem__)
        strength = [float(norm(values[k])) for k in order]
        colors = [(*cmap(level)[:3], 0.12 + 0.88 * level) for level in strength]
        lines = LineCollection([segments[k] for k in order], colors=colors, linewidths=[0.3 + 2.2 * v for v in strength])
        ax.add_collection(lines)
        for c, column in enumerate(nodes):
            live = neuron_alive[c][column]
            y = torch.tensor(ys[c])
            ax.scatter([c] * int(live.sum()), y[live], s=36, color="black", zorder=3)
            ax.scatter([c] * int((~live).sum()), y[~live], s=36, facecolors="white", edgecolors="grey", zorder=3)
            shown = "" if len(column) == sizes[c] else f"\n({len(column)} shown)"
            alive_count = int(neuron_alive[c].sum())
            name = "input" if c == 0 else layers[c - 1].name
            ax.text(c, -0.07, f"{name}\n{alive_count}/{sizes[c]} alive{shown}", ha="center", va="top", fontsize=9)
        kept = sum(int(alive.sum()) for _, alive in chain)
        drawn = f"{len(segments)} kept, {len(removed)} removed (dotted grey)" if row else f"{len(segments)}"
        ax.set_title(f"{title}\n{kept:,} connections kept; drawn: {drawn}", fontsize=11)
        ax.set_xlim(-0.3, len(nodes) - 0.7)
        ax.set_ylim(-0.28, 1.05)
        ax.axis("off")
        if heatmap:
            hax = fig.add_subplot(grid[row, 1])
            pixel = layers[0].scores.sum(0).view(input_shape[1:])
            pruned = ~layers[0].alive.any(0).view(input_shape[1:])
            pixel_images.append((hax, pixel, pruned))
    if heatmap:
        pmax = max(float(p.max()) for _, p, _ in pixel_images) or 1.0
        pixel_cmap = plt.get_cmap("magma").with_extremes(bad="#bbbbbb")
        image = None
        for (hax, pixel, pruned), title in zip(pixel_images, titles):
            values = np.ma.masked_array(pixel.numpy(), mask=pruned.numpy())
            image = hax.imshow(values, cmap=pixel_cmap, vmin=0.0, vmax=pmax)
            hax.set_title(f"input pixels, {title.split(' (')[0]}\n{int((~pruned).sum())}/{pruned.numel()} connected", fontsize=10)
            hax.set_xticks([])
            hax.set_yticks([])
        fig.colorbar(image, ax=[p[0] for p in pixel_images], shrink=0.5, label=r"pixel importance $\sum_j s_{ij}$ (layer 1)")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=graph_axes, location="bottom", shrink=0.6, aspect=40,
                 label=r"connection importance $s_{ij} = a_{ij}/S_j$ (log; fainter and thinner = less important)")  # fmt: skip
    save(fig, Path(path))
    wide = [("input" if c == 0 else dense[c - 1].name, sizes[c]) for c in range(len(sizes)) if sizes[c] > max_nodes]
    caption = (
        f"Connections coloured by NNrelief importance s_ij = a_ij / S_j (log scale, thicker = more important); "
        f"top: {titles[0]}, bottom: {titles[1]}, where the connections pruning removed are dotted grey. "
        "Black dots: alive neurons, hollow: removed."
    )
    if wide:
        caption += (
            " Of " + ", ".join(f"{name} ({size})" for name, size in wide) + f" {max_nodes} neurons are drawn (the same "
            "ones in both rows), at evenly spaced ranks of the connections they keep, from most to fewest, so that "
            "they lose as much as their layer."
        )
    if any(layer.kind == "conv" for layer in dense):
        caption += " A conv connection is a whole kernel; FC inputs after a conv are summed per channel."
    if heatmap:
        caption += (
            " Right: total importance of each input pixel for layer 1 (sum over its neurons of s_ij); "
            "grey pixels have no connection left."
        )
    return caption


def _spread(count: int) -> list[float]:
    """Vertical positions of ``count`` dots, centred in [0, 1]."""
    if count == 1:
        return [0.5]
    return [1.0 - k / (count - 1) for k in range(count)]
