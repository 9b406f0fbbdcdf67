"""Figures 4-5 of the paper: test accuracy and remaining weights across iterations, several
runs overlaid (:func:`plot_accuracy`); and accuracy vs remaining weights or MACs of several
pruning methods (:func:`plot_comparison`, used by ``nnrelief compare``)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from .figures import count_axis, percent_axis, pyplot, save
from .runs import RunData, unique_labels


def plot_accuracy(runs: Sequence[RunData], path: str | os.PathLike[str]) -> str:
    """Test accuracy and remaining weights across iterations (paper, Figures 4-5), one
    colour per run: accuracy vs iteration (solid: after retraining, dashed: right after
    pruning), remaining weights vs iteration (log) and accuracy vs remaining weights
    (log). Returns a caption."""
    plt = pyplot()
    fig, (acc, remaining, tradeoff) = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    colors = plt.get_cmap("tab10")
    labels = unique_labels(runs)
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
    percent_axis(remaining.yaxis, everything)
    tradeoff.set_xscale("log")
    tradeoff.set_xlabel("remaining weights and biases (%, log)")
    tradeoff.set_ylabel("test accuracy after retraining (%)")
    tradeoff.set_title("accuracy vs remaining weights", fontsize=10)
    percent_axis(tradeoff.xaxis, everything)
    tradeoff.invert_xaxis()
    for ax in (acc, remaining, tradeoff):
        ax.grid(which="both", alpha=0.3)
    for ax in (acc, remaining):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(*acc.get_legend_handles_labels(), loc="outside lower center", fontsize=9,
               ncols=min(len(runs), 3), frameon=False)  # fmt: skip
    save(fig, Path(path))
    return (
        "Left: test accuracy after retraining (solid) and right after each pruning pass (dashed) per iteration "
        "(iteration 0 = dense). Middle: remaining weights and biases of the Linear/conv layers (log). "
        "Right: test accuracy against remaining weights (log, pruning proceeds to the right)."
    )


_X_AXES = {
    "weights": ("remaining weights and biases (%, log)", percent_axis),
    "macs": ("MACs of one input, unpruned weights (log)", count_axis),
}


def plot_comparison(
    curves: Mapping[str, Sequence[tuple[float, float, float]]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    x: str = "weights",
) -> None:
    """Test accuracy vs remaining weights or MACs (log x), one line per method.

    ``curves[method]`` lists ``(x value, accuracy after retraining, accuracy right after
    pruning)`` per iteration, accuracies in percent; the x values are remaining weights in
    percent (``x="weights"``) or MACs (``x="macs"``).
    """
    if x not in _X_AXES:
        raise ValueError(f"x must be one of {sorted(_X_AXES)}, got {x!r}")
    label, ticks = _X_AXES[x]
    plt = pyplot()
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
        ticks(ax.xaxis, [p[0] for points in curves.values() for p in points])
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"test accuracy {what}", fontsize=10)
        ax.grid(which="both", alpha=0.3)
    after.invert_xaxis()
    fig.legend(*after.get_legend_handles_labels(), loc="outside lower center", fontsize=9,
               ncols=len(curves), frameon=False)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=11)
    save(fig, Path(path))


def plot_one_shot(
    summary: Mapping[str, Mapping[float, tuple[float, float, float, int]]],
    path: str | os.PathLike[str],
    *,
    metric: str,
    title: str = "",
) -> None:
    """A one-shot comparison's metric against the sparsity each method reached (not the one
    asked: a pass that removes more shows where it landed), one line per method with the
    spread over calibration draws as error bars (``summary``: :meth:`OneShot.summary`,
    method -> sparsity -> (mean, standard deviation, remaining fraction, draws)); the
    dense model's value (method ``"dense"``) as a horizontal line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    markers = "osD^v<>p*hX"
    for k, (method, by) in enumerate((m, b) for m, b in summary.items() if m != "dense"):
        points = sorted(by.items())
        ax.errorbar([100 * (1 - v[2]) for _, v in points], [v[0] for _, v in points], yerr=[v[1] for _, v in points],
                    marker=markers[k % len(markers)], markersize=5, capsize=3, label=method,
                    linewidth=2.2 if method.startswith("nnrelief") else 1.3)  # fmt: skip
    dense = summary.get("dense", {}).get(0.0)
    if dense is not None:
        ax.axhline(dense[0], color="grey", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("sparsity reached in the scored layers (% of weights and biases removed)")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(textwrap.fill(title, 100), fontsize=9)
    save(fig, Path(path))
