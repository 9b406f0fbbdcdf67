"""Figures and the Markdown report of NNrelief run folders (``nnrelief report``).

The figures follow the paper's:

* :func:`plot_connections` - the network before and after pruning, neurons as dots per
  layer and connections coloured by their NNrelief importance ``s_ij = a_ij / S_j``
  (Figure 2), next to a heat map of the input pixels' total importance for layer 1;
* :func:`plot_architecture` - alive neurons/channels per layer, dense vs each iteration
  (Figure 3);
* :func:`plot_accuracy` - test accuracy and remaining weights across iterations, several
  runs overlaid (Figures 4-5);
* :func:`plot_comparison` - accuracy vs remaining weights of several pruning methods
  (used by ``nnrelief compare``).

:func:`write_report` draws them for a list of run folders and writes ``report.md``.
matplotlib (the ``plots`` extra) is imported only when a figure is drawn, with the Agg
backend, so the rest of the package does not need it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import data as nndata
from . import scores as score_fns
from .experiments import runfolder as files
from .experiments.config import ConfigError, ExperimentConfig, derive_seed
from .experiments.experiment import load_weights
from .experiments.history import History
from .experiments.runfolder import RunFolder
from .fileio import save_text
from .graph import build_graph
from .masks import current_mask
from .stats import collect, input_key

__all__ = [
    "ConnectionScores",
    "MissingPlotDependencyError",
    "RunData",
    "connection_scores",
    "load_run",
    "plot_accuracy",
    "plot_architecture",
    "plot_comparison",
    "plot_connections",
    "pruning_inputs",
    "write_report",
]

logger = logging.getLogger(__name__)

_DPI = 120


class MissingPlotDependencyError(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise MissingPlotDependencyError(
            "figures need matplotlib: pip install 'nnrelief[plots]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    _pyplot().close(fig)
    logger.info("wrote %s", path)


# ----------------------------------------------------------------------------- runs


@dataclass
class RunData:
    """A finished (or running) run folder: its settings and history."""

    path: Path
    config: ExperimentConfig
    history: History

    @property
    def label(self) -> str:
        """Legend label: model, optimizer and seed (plus alpha when not the default)."""
        cfg = self.config
        alpha = f", alpha_fc {cfg.alpha_fc:g}" + (f"/conv {cfg.alpha_conv:g}" if _has_conv(self) else "")
        return f"{cfg.model}, {cfg.optimizer}, seed {cfg.seed}{alpha}"

    @property
    def name(self) -> str:
        """The folder name."""
        return self.path.name


def _has_conv(run: RunData) -> bool:
    report = run.history.records[-1].report if run.history.records else None
    return bool(report) and any(layer["kind"] == "conv" for layer in report["layers"])


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read ``config.json`` and ``history.json`` of a run folder (nothing is written)."""
    folder = RunFolder(run_dir)
    for needed in (files.CONFIG, files.HISTORY_JSON):
        if not folder.exists(needed):
            raise ConfigError(f"{folder.path} is not a finished run folder: {needed} is missing")
    return RunData(folder.path, ExperimentConfig.from_dict(folder.read_json(files.CONFIG)), folder.read_history())


# ----------------------------------------------------------------------------- scores


@dataclass
class ConnectionScores:
    """NNrelief importance of every connection of one Linear/Conv2d layer.

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
    """The relative scores of every prunable Linear/Conv2d layer on ``inputs`` (one batch).

    The statistics and contributions are those of a pruning pass (:func:`nnrelief.stats.collect`,
    :func:`nnrelief.scores.contributions`); ``score="authors"`` uses the authors' conv variant.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        graph = build_graph(model, inputs)
        stats = collect(model, graph, [inputs], score)
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


# ----------------------------------------------------------------------------- figure 2


def _select_nodes(
    dense: list[tuple[Tensor, Tensor]], final: list[tuple[Tensor, Tensor]], max_nodes: int
) -> list[Tensor]:
    """Indices of the nodes drawn per column: all if at most ``max_nodes``, else the
    ``max_nodes`` with the most connections alive after pruning (ties: higher total
    score in the dense model), in index order."""
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
        chosen.append(rank.topk(max_nodes).indices.sort().values)
    return chosen


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
    by its relative score ``s_ij`` (log colour scale shared by both rows). Layers wider
    than ``max_nodes`` show only the ``max_nodes`` neurons with the most connections left
    after pruning. If the first layer is fully connected on a one-channel image
    (``input_shape`` = (1, H, W)), a heat map of each pixel's total score sum_j s_ij is
    drawn alongside; grey pixels have no connection left. Conv layers count a kernel as
    one connection; an FC layer after a conv gets its inputs summed per channel.

    Returns:
        A caption describing what is shown.
    """
    plt = _pyplot()
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
        segments, values = [], []
        for c, (scores, alive) in enumerate(chain):
            for a, j in enumerate(nodes[c + 1].tolist()):
                for b, i in enumerate(nodes[c].tolist()):
                    if alive[j, i]:
                        segments.append(((c, ys[c][b]), (c + 1, ys[c + 1][a])))
                        values.append(max(float(scores[j, i]), vmin))
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
        ax.set_title(f"{title}: {kept:,} connections kept, {len(segments)} drawn", fontsize=11)
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
    _save(fig, Path(path))
    wide = [("input" if c == 0 else dense[c - 1].name, sizes[c]) for c in range(len(sizes)) if sizes[c] > max_nodes]
    caption = (
        f"Connections coloured by NNrelief importance s_ij = a_ij / S_j (log scale, thicker = more important); "
        f"top: {titles[0]}, bottom: {titles[1]}. Black dots: alive neurons, hollow: removed."
    )
    if wide:
        caption += (
            " Of " + ", ".join(f"{name} ({size})" for name, size in wide) + f" only the {max_nodes} neurons with the "
            "most connections left after pruning are drawn (the same ones in both rows)."
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


# ----------------------------------------------------------------------------- figure 3


def _shown_iterations(iterations: Sequence[int], limit: int) -> list[int]:
    """At most ``limit`` iterations, evenly spread, always the first and the last."""
    if len(iterations) <= limit:
        return list(iterations)
    picks = {round(k * (len(iterations) - 1) / (limit - 1)) for k in range(limit)}
    return [iterations[k] for k in sorted(picks)]


def plot_architecture(run: RunData, path: str | os.PathLike[str], *, max_bars: int = 8) -> str:
    """Alive neurons/channels per layer (paper, Figure 3): grouped bars for the dense
    model and up to ``max_bars`` iterations (log scale), and the alive fraction of each
    layer across all iterations. Returns a caption."""
    plt = _pyplot()
    records = run.history.records
    layers = list(records[0].channels_total)
    shown = _shown_iterations([r.iteration for r in records], max_bars)
    by_iteration = {r.iteration: r for r in records}
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained",
                                      gridspec_kw={"width_ratios": [1.5, 1]})  # fmt: skip
    cmap = plt.get_cmap("viridis")
    width = 0.8 / len(shown)
    for k, iteration in enumerate(shown):
        record = by_iteration[iteration]
        xs = [position - 0.4 + (k + 0.5) * width for position in range(len(layers))]
        color = "#444444" if iteration == 0 else cmap(0.15 + 0.8 * k / max(len(shown) - 1, 1))
        label = "dense" if iteration == 0 else f"iteration {iteration}"
        bars.bar(xs, [record.alive[name] for name in layers], width=width * 0.95, color=color, label=label)
    final = by_iteration[shown[-1]]
    for position, name in enumerate(layers):
        bars.text(position + 0.4 - width / 2, final.alive[name], str(final.alive[name]), ha="center", va="bottom", fontsize=8)
    bars.set_yscale("log")
    bars.set_xticks(range(len(layers)), [f"{name}\n({records[0].channels_total[name]})" for name in layers],
                    rotation=0 if len(layers) <= 8 else 60, fontsize=9)  # fmt: skip
    bars.set_ylabel("alive neurons / channels (log)")
    bars.set_title("architecture per iteration")
    bars.legend(fontsize=8, ncols=2 if len(shown) > 4 else 1, loc="best", framealpha=0.9)
    bars.grid(axis="y", which="both", alpha=0.3)
    iterations = [r.iteration for r in records]
    layer_colors = plt.get_cmap("tab10" if len(layers) <= 10 else "tab20")
    for k, name in enumerate(layers):
        total = records[0].channels_total[name]
        lines.plot(iterations, [100.0 * r.alive[name] / total for r in records], marker="o", markersize=4,
                   color=layer_colors(k % layer_colors.N), label=name)  # fmt: skip
    lines.set_xlabel("iteration")
    lines.set_ylabel("alive neurons / channels (% of dense)")
    lines.set_title("alive fraction per layer")
    lines.set_xticks(iterations if len(iterations) <= 12 else iterations[:: math.ceil(len(iterations) / 12)])
    lines.grid(alpha=0.3)
    lines.legend(fontsize=8, ncols=1 if len(layers) <= 8 else 2)
    fig.suptitle(run.label, fontsize=11)
    _save(fig, Path(path))
    subset = "" if len(shown) == len(records) else f" (bars: iterations {', '.join(map(str, shown))} of {len(records) - 1})"
    return (
        f"Alive neurons/channels per layer (in brackets: dense width), dense vs pruning iterations{subset}; "
        "right: the same as a percentage of the dense width across all iterations."
    )


# ----------------------------------------------------------------------------- figures 4-5


def plot_accuracy(runs: Sequence[RunData], path: str | os.PathLike[str]) -> str:
    """Test accuracy and remaining weights across iterations (paper, Figures 4-5), one
    colour per run: accuracy vs iteration (solid: after retraining, dashed: right after
    pruning), remaining weights vs iteration (log) and accuracy vs remaining weights
    (log). Returns a caption."""
    plt = _pyplot()
    fig, (acc, remaining, tradeoff) = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    colors = plt.get_cmap("tab10")
    labels = _unique_labels(runs)
    for k, (run, label) in enumerate(zip(runs, labels)):
        records = run.history.records
        iterations = [r.iteration for r in records]
        after = [100.0 * r.accuracy_after["test"] for r in records]
        before = [100.0 * r.accuracy_before["test"] for r in records]
        percent = [r.remaining_percent for r in records]
        color = colors(k % 10)
        acc.plot(iterations, after, marker="o", markersize=4, color=color, label=label)
        acc.plot(iterations[1:], before[1:], linestyle="--", marker="x", markersize=4, color=color, alpha=0.6)
        remaining.plot(iterations, percent, marker="o", markersize=4, color=color, label=label)
        tradeoff.plot(percent, after, marker="o", markersize=4, color=color, label=label)
        if run.history.selected_iteration != records[-1].iteration:
            selected = run.history.selected_iteration
            acc.scatter([selected], [after[selected]], s=120, facecolors="none", edgecolors=color, zorder=4)
    acc.set_xlabel("iteration")
    acc.set_ylabel("test accuracy (%)")
    acc.set_title("test accuracy (solid: retrained, dashed: right after pruning)", fontsize=10)
    remaining.set_xlabel("iteration")
    remaining.set_ylabel("remaining weights and biases (%, log)")
    remaining.set_yscale("log")
    remaining.set_title("remaining weights", fontsize=10)
    everything = [r.remaining_percent for run in runs for r in run.history.records]
    _percent_axis(remaining.yaxis, everything)
    tradeoff.set_xscale("log")
    tradeoff.set_xlabel("remaining weights and biases (%, log)")
    tradeoff.set_ylabel("test accuracy after retraining (%)")
    tradeoff.set_title("accuracy vs remaining weights", fontsize=10)
    _percent_axis(tradeoff.xaxis, everything)
    tradeoff.invert_xaxis()
    for ax in (acc, remaining, tradeoff):
        ax.grid(which="both", alpha=0.3)
    for ax in (acc, remaining):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(*acc.get_legend_handles_labels(), loc="outside lower center", fontsize=9,
               ncols=min(len(runs), 3), frameon=False)  # fmt: skip
    _save(fig, Path(path))
    return (
        "Left: test accuracy after retraining (solid) and right after each pruning pass (dashed) per iteration "
        "(iteration 0 = dense). Middle: remaining weights and biases of the Linear/conv layers (log). "
        "Right: test accuracy against remaining weights (log, pruning proceeds to the right)."
    )


def _percent_axis(axis: Any, values: Iterable[float]) -> None:
    """Log-scale percent ticks: 1-2-5 per decade, denser when the data span less than one."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0]
    narrow = not positive or max(positive) / min(positive) < 10
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}%"))
    axis.set_minor_formatter(NullFormatter())


def _unique_labels(runs: Sequence[RunData]) -> list[str]:
    labels = [run.label for run in runs]
    return [f"{label} ({run.name})" if labels.count(label) > 1 else label for label, run in zip(labels, runs)]


def plot_comparison(
    curves: Mapping[str, Sequence[tuple[float, float, float]]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
) -> None:
    """Test accuracy vs remaining weights (log x), one line per method.

    ``curves[method]`` lists ``(remaining percent, accuracy after retraining, accuracy
    right after pruning)`` per iteration, accuracies in percent.
    """
    plt = _pyplot()
    fig, (after, before) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained", sharex=True)
    markers = "osD^v<>p"
    for k, (method, points) in enumerate(curves.items()):
        xs = [p[0] for p in points]
        style = {"marker": markers[k % len(markers)], "markersize": 5, "label": method,
                 "linewidth": 2.2 if method == "nnrelief" else 1.4}  # fmt: skip
        after.plot(xs, [p[1] for p in points], **style)
        before.plot(xs, [p[2] for p in points], **style)
    for ax, what in ((after, "after retraining"), (before, "right after pruning (before retraining)")):
        ax.set_xscale("log")
        _percent_axis(ax.xaxis, [p[0] for points in curves.values() for p in points])
        ax.set_xlabel("remaining weights and biases (%, log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"test accuracy {what}", fontsize=10)
        ax.grid(which="both", alpha=0.3)
    after.invert_xaxis()
    fig.legend(*after.get_legend_handles_labels(), loc="outside lower center", fontsize=9,
               ncols=len(curves), frameon=False)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, Path(path))


# ----------------------------------------------------------------------------- report


def history_markdown(history: History) -> str:
    """The per-iteration table of a history as a Markdown table (accuracies in percent)."""
    records = history.records
    sets = list(records[0].accuracy_after)
    layers = list(records[0].alive)
    header = ["iter"]
    for name in sets:
        header += [f"{name} before", f"{name} after"]
    header += ["remaining", "remaining %", "compression", "MACs sparse", "alive " + "-".join(layers)
               if len(layers) <= 6 else "alive channels"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in records:
        row = [str(r.iteration) + (" (selected)" if r.iteration == history.selected_iteration and r.iteration else "")]
        for name in sets:
            row += ["-" if r.iteration == 0 else f"{100 * r.accuracy_before[name]:.2f}", f"{100 * r.accuracy_after[name]:.2f}"]
        alive = ("-".join(str(r.alive[n]) for n in layers) if len(layers) <= 6
                 else f"{sum(r.alive.values())}/{sum(r.channels_total.values())}")  # fmt: skip
        row += [f"{r.params_remaining:,}", f"{r.remaining_percent:.2f}", f"{r.compression:.2f}x", f"{r.macs_sparse:,}", alive]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _settings_line(cfg: ExperimentConfig) -> str:
    alphas = f"alpha_fc {cfg.alpha_fc:g}, alpha_conv {cfg.alpha_conv:g}"
    retrain = "rewind to init" if cfg.rewind else "fine-tune"
    subset = f", train subset {cfg.train_subset}" if cfg.train_subset else ""
    return (
        f"{cfg.model} on {cfg.dataset}{subset}; {cfg.optimizer} lr {cfg.lr:g}, wd {cfg.weight_decay:g}, batch "
        f"{cfg.batch_size}, {cfg.epochs} dense + {cfg.retrain_epochs} retraining epochs ({retrain}); {alphas}, "
        f"score {cfg.score}, pruning set {cfg.prune_samples}; seed {cfg.seed}"
    )


def write_report(
    run_dirs: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    iteration: int | None = None,
    samples: int = 500,
    data_dir: str | None = None,
    max_nodes: int = 12,
) -> Path:
    """Draw the figures of the given run folders into ``out_dir`` and write ``report.md``.

    Per run: the connection picture (dense = ``model-iter0.pt`` vs ``iteration``, default
    the run's selected one; scores on ``samples`` training images of the run's dataset,
    read from ``data_dir`` or the run's), the architecture figure and the per-iteration
    table. For all runs together: the accuracy / remaining-weights figure. A run whose
    connection picture cannot be drawn (dataset missing, model not a chain of layers) gets
    a note instead. Returns the path of ``report.md``.
    """
    runs = [load_run(path) for path in run_dirs]
    if not runs:
        raise ValueError("write_report needs at least one run folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefixes = _prefixes(runs)
    lines = ["# NNrelief report", ""]
    caption = plot_accuracy(runs, out / "accuracy.png")
    lines += ["## Accuracy and remaining weights", "", "![accuracy](accuracy.png)", "", caption, ""]
    for run, prefix in zip(runs, prefixes):
        records = run.history.records
        lines += [f"## {run.name}", "", f"`{run.path}`: {_settings_line(run.config)}.", ""]
        last, selected = records[-1].iteration, records[run.history.selected_iteration]
        status = "stopped early" if run.history.stopped_early else "finished" if last >= run.config.num_iters else "in progress"
        lines += [
            (f"{last} of {max(last, run.config.num_iters)} iterations ({status}); selected iteration {selected.iteration}: "
             f"test accuracy {100 * selected.accuracy_after['test']:.2f}% (dense {100 * records[0].accuracy_after['test']:.2f}%), "
             f"{selected.params_remaining:,} of {records[0].params_total:,} weights and biases left "
             f"({selected.compression:.2f}x)."),
            "",
        ]  # fmt: skip
        name = f"{prefix}connections.png"
        try:
            caption = _connections_for_run(run, out / name, iteration, samples, data_dir, max_nodes)
            lines += ["### Connections before and after pruning", "", f"![connections]({name})", "", caption, ""]
        except (ConfigError, ValueError, FileNotFoundError, KeyError) as error:
            logger.warning("%s: no connection picture: %s", run.name, error)
            lines += ["### Connections before and after pruning", "", f"(not drawn: {error})", ""]
        name = f"{prefix}architecture.png"
        caption = plot_architecture(run, out / name)
        lines += ["### Architecture", "", f"![architecture]({name})", "", caption, ""]
        lines += ["### Iterations", "", history_markdown(run.history), "",
                  ("Accuracies in percent (validation split held out from the training data; test set). "
                   "'before' = right after the pruning pass, 'after' = after retraining."), ""]  # fmt: skip
    path = out / "report.md"
    save_text("\n".join(lines) + "\n", path)
    logger.info("wrote %s", path)
    return path


def _prefixes(runs: Sequence[RunData]) -> list[str]:
    if len(runs) == 1:
        return [""]
    names = [run.name for run in runs]
    return [f"{name}-" if names.count(name) == 1 else f"{name}-{k}-" for k, name in enumerate(names)]


def _connections_for_run(
    run: RunData, path: Path, iteration: int | None, samples: int, data_dir: str | None, max_nodes: int
) -> str:
    chosen = run.history.selected_iteration if iteration is None else iteration
    last = run.history.records[-1].iteration
    if last == 0:
        raise ValueError("the run has no pruned iteration yet")
    if not 1 <= chosen <= last:
        raise ValueError(f"iteration {chosen} is not a pruning iteration of this run (1-{last})")
    inputs = pruning_inputs(run.config, samples, data_dir)
    dense, _ = load_weights(run.path / files.model_file(0))
    final, _ = load_weights(run.path / files.model_file(chosen))
    graph = build_graph(dense, inputs[:1])
    if graph.joins:
        raise ValueError(f"{run.config.model} has residual connections; the picture needs a plain chain of layers")
    records = {r.iteration: r for r in run.history.records}
    titles = (
        f"dense (iteration 0, test {100 * records[0].accuracy_after['test']:.2f}%)",
        (f"iteration {chosen} ({records[chosen].remaining_percent:.2f}% of the weights, "
         f"test {100 * records[chosen].accuracy_after['test']:.2f}%)"),
    )  # fmt: skip
    caption = plot_connections(
        connection_scores(dense, inputs, run.config.score), connection_scores(final, inputs, run.config.score),
        path, titles=titles, input_shape=tuple(inputs.shape[1:]), max_nodes=max_nodes,
    )  # fmt: skip
    return caption + f" Scores from {len(inputs)} training images."
