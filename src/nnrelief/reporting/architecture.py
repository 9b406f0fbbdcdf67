"""Figure 3 of the paper: alive neurons/channels per layer, dense vs each iteration."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from .figures import pyplot, save
from .runs import RunData


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
    plt = pyplot()
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
    save(fig, Path(path))
    subset = "" if len(shown) == len(records) else f" (bars: iterations {', '.join(map(str, shown))} of {len(records) - 1})"
    return (
        f"Alive neurons/channels per layer (in brackets: dense width), dense vs pruning iterations{subset}; "
        "right: the same as a percentage of the dense width across all iterations."
    )
