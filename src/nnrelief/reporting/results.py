"""Reproduction results: one JSON file per run, and the tables and figures made from them.

A results file (``nnrelief report RUN --json FILE``) holds what a reader of a paper's table
needs and nothing that depends on this package's internals::

    {"format": 1, "model": "resnet20", "dataset": "cifar10", "device": "...",
     "command": "nnrelief prune ...", "settings": {...the run's config.json...},
     "wall_time_s": 6123.4, "wall_time_parts_s": {"dense": 3000.1, "nnrelief": 3123.3},
     "iterations": [{"iteration": 0, "remaining_percent": 100.0, "test_accuracy": 0.91,
                     "val_accuracy": 0.90, "macs": 40551424, ...}, ...],
     "baselines": [{"method": "global-magnitude", "iteration": 1,
                    "remaining_percent": 61.2, "test_accuracy": 0.90, "macs": 25123456}, ...]}

Accuracies are fractions in [0, 1]; iteration 0 is the dense model; ``macs`` counts the
unpruned weights of one input. Baselines come from ``nnrelief compare`` (the run's
``compare/<method>/history.json``). Reading a run folder never writes to it. Files of runs
that differ only by seed make one table and one set of lines (:mod:`.seeds`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..experiments import checksums
from ..experiments import runfolder as files
from ..experiments.config import ConfigError, reproduce_command
from ..experiments.history import History
from ..experiments.runfolder import RunFolder
from ..fileio import save_text
from .figures import count_axis, percent_axis, pyplot, save
from .runs import load_run
from .seeds import Spread, seeds_markdown, spreads

__all__ = [
    "RESULTS_FORMAT",
    "load_results",
    "plot_results",
    "run_labels",
    "results_markdown",
    "results_summary",
    "results_tables",
    "run_results",
    "save_results",
    "update_marked_blocks",
    "validate_results",
]

RESULTS_FORMAT = 1
_REQUIRED = ("model", "dataset", "device", "command", "settings", "wall_time_s", "iterations", "baselines")
_ITERATION_KEYS = ("iteration", "remaining_percent", "test_accuracy", "val_accuracy", "macs")
_BASELINE_KEYS = ("method", "remaining_percent", "test_accuracy")
_NOT_DISTINGUISHING = frozenset({"data_dir", "device", "seed"})  # not what a legend tells runs apart by


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}): not a results file") from None


def _wall_times(run_dir: Path, history: History, baselines: Mapping[str, History]) -> dict[str, float]:
    """Seconds per part of a run: ``dense`` training (from writing ``init.pt`` to writing
    ``trained.pt``, as the folder's checksums recorded them; left out where they did not,
    e.g. a folder written before they recorded times; a pause of a resumed dense phase
    counts), ``nnrelief`` (its iterations' own wall times) and one entry per baseline of
    ``nnrelief compare``; pauses between resumed iterations are not counted."""
    init, trained = (checksums.written_at(run_dir, name) for name in (files.INIT, files.TRAINED))
    parts = {} if init is None or trained is None else {"dense": max(trained - init, 0.0)}
    parts["nnrelief"] = sum(record.seconds for record in history.records)
    for method, baseline in baselines.items():
        parts[method] = sum(record.seconds for record in baseline.records)
    return parts


def _baseline_histories(run_dir: Path) -> dict[str, History]:
    """The history of each baseline of ``nnrelief compare`` in the run folder, by method."""
    compare = run_dir / "compare"
    if not compare.is_dir():
        return {}
    dirs = sorted(p for p in compare.iterdir() if (p / files.HISTORY_JSON).is_file())
    return {method_dir.name: RunFolder(method_dir).read_history() for method_dir in dirs}


def _baselines(baselines: Mapping[str, History]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for method, history in baselines.items():
        for record in history.records[1:]:
            rows.append({
                "method": method,
                "iteration": record.iteration,
                "remaining_percent": record.remaining_percent,
                "test_accuracy": record.accuracy_after["test"],
                "params_remaining": record.params_remaining,
                "macs": record.macs_sparse,
            })  # fmt: skip
    return rows


def run_results(
    run_dir: str | os.PathLike[str], *, command: str | None = None, device: str | None = None
) -> dict[str, Any]:
    """The results dict of a finished (or partly finished) run folder.

    Args:
        run_dir: the run folder (``config.json`` and ``history.json`` are needed).
        command: the exact command that made the run (default: :func:`reproduce_command`).
        device: where it ran, e.g. ``"cpu (2 cores)"`` (default: the config's device).
    """
    run = load_run(run_dir)
    run_dir, cfg, history = run.path, run.config, run.history
    baselines = _baseline_histories(run_dir)
    parts = _wall_times(run_dir, history, baselines)
    iterations = []
    for record in history.records:
        iterations.append({
            "iteration": record.iteration,
            "remaining_percent": record.remaining_percent,
            "test_accuracy": record.accuracy_after["test"],
            "val_accuracy": record.accuracy_after["val"],
            "macs": record.macs_sparse,
            "test_accuracy_before_retraining": record.accuracy_before["test"],
            "params_remaining": record.params_remaining,
            "params_total": record.params_total,
            "channels_alive": sum(record.alive.values()),
            "channels_total": sum(record.channels_total.values()),
        })  # fmt: skip
    results = {
        "format": RESULTS_FORMAT,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "device": device if device is not None else cfg.device,
        "command": command if command is not None else reproduce_command(cfg),
        "settings": cfg.to_dict(),
        "wall_time_s": sum(parts.values()),
        "wall_time_parts_s": parts,
        "iterations": iterations,
        "baselines": _baselines(baselines),
    }
    return validate_results(results, str(run_dir))


def _fraction(value: Any, where: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: accuracy must be a fraction in [0, 1], got {value!r}")


def validate_results(data: Any, source: str = "results") -> dict[str, Any]:
    """Check the structure of a results dict; raises :class:`ConfigError` naming what is
    wrong and where. Returns ``data``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {missing}")
    if not data["iterations"] or data["iterations"][0].get("iteration") != 0:
        raise ConfigError(f"{source}: 'iterations' must start with iteration 0 (the dense model)")
    for kind, rows, keys in (("iterations", data["iterations"], _ITERATION_KEYS),
                             ("baselines", data["baselines"], _BASELINE_KEYS)):  # fmt: skip
        for i, row in enumerate(rows):
            where = f"{source}: {kind}[{i}]"
            absent = [key for key in keys if key not in row]
            if absent:
                raise ConfigError(f"{where}: missing key(s) {absent}")
            _fraction(row["test_accuracy"], where)
            if "val_accuracy" in row:
                _fraction(row["val_accuracy"], where)
            if not 0.0 <= row["remaining_percent"] <= 100.0:
                raise ConfigError(f"{where}: remaining_percent must be in [0, 100], got {row['remaining_percent']!r}")
    return dict(data)


def save_results(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate and write ``data`` as indented JSON (atomically)."""
    validate_results(data, str(path))
    save_text(json.dumps(data, indent=2) + "\n", path)
    return Path(path)


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a results file."""
    path = Path(path)
    return validate_results(_read_json(path), str(path))


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _matched_baseline(results: Mapping[str, Any], iteration: int) -> str:
    """Each baseline pruned to NNrelief's ``iteration``: its test accuracy, then the weights
    and MACs it kept (a baseline matches NNrelief in one of them, not in both)."""
    return ", ".join(
        f"{row['method']} {_percent(row['test_accuracy'])} ({_baseline_size(row)})"
        for row in results["baselines"]
        if row.get("iteration") == iteration
    )


def _baseline_size(row: Mapping[str, Any]) -> str:
    size = f"{row['remaining_percent']:.2f}%"
    return f"{size}, {_count(row['macs'])} MACs" if row.get("macs") is not None else size


def _count(value: float) -> str:
    """``1234 -> '1.2K'``, ``40551424 -> '40.6M'``: MACs at a readable scale."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _title(results: Mapping[str, Any]) -> str:
    done = len(results["iterations"]) - 1
    planned = results["settings"].get("num_iters")
    progress = f", {done} of {planned} iterations done" if isinstance(planned, int) and done < planned else ""
    parts = results.get("wall_time_parts_s") or {}
    split = ": " + ", ".join(f"{name} {seconds / 60:.0f}" for name, seconds in parts.items()) if parts else ""
    return (f"**{results['model']} on {results['dataset']}** ({results['device']}, "
            f"wall time {results['wall_time_s'] / 60:.0f} min{split}{progress})")  # fmt: skip


def results_summary(results: Mapping[str, Any], within_points: float = 1.0) -> str:
    """One sentence: the dense test accuracy, the iteration with the fewest remaining weights
    whose test accuracy is within ``within_points`` percentage points of dense (none: said so),
    and each baseline's test accuracy (weights, MACs) at that iteration."""
    dense = results["iterations"][0]["test_accuracy"]
    close = [row for row in results["iterations"][1:] if 100 * (dense - row["test_accuracy"]) <= within_points]
    text = f"Dense: {_percent(dense)} test accuracy. "
    if not close:
        return text + f"No iteration is within {within_points:g} point of dense."
    best = min(close, key=lambda row: row["remaining_percent"])
    text += (f"Fewest weights within {within_points:g} point of dense: iteration {best['iteration']}, "
             f"{best['remaining_percent']:.2f}% of the weights at {_percent(best['test_accuracy'])}")  # fmt: skip
    baselines = _matched_baseline(results, best["iteration"])
    return text + (f"; at the same iteration {baselines}." if baselines else ".")


def results_markdown(results: Mapping[str, Any]) -> str:
    """A Markdown table of one results file: per iteration the remaining weights, test
    accuracy before/after retraining, validation accuracy, MACs, alive channels and, for each
    baseline at the same iteration, its test accuracy, weights and MACs; then
    :func:`results_summary`."""
    iterations = results["iterations"]
    dense = iterations[0]
    lines = [
        _title(results),
        "",
        "| iter | remaining | compression | test before | test after | val after | vs dense | MACs | channels | baselines: test (weights, MACs) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in iterations:
        compression = 100.0 / row["remaining_percent"] if row["remaining_percent"] else math.inf
        delta = 100 * (row["test_accuracy"] - dense["test_accuracy"])
        channels = f"{row.get('channels_alive', '')}"
        lines.append(
            f"| {row['iteration']} | {row['remaining_percent']:.2f}% | {compression:.1f}x | "
            f"{_percent(row.get('test_accuracy_before_retraining', row['test_accuracy']))} | "
            f"{_percent(row['test_accuracy'])} | {_percent(row['val_accuracy'])} | {delta:+.2f} | "
            f"{_count(row['macs'])} | {channels} | {_matched_baseline(results, row['iteration'])} |"
        )
    return "\n".join([*lines, "", results_summary(results)]) + "\n"


def update_marked_blocks(text: str, blocks: Mapping[str, str], source: str = "document") -> str:
    """Replace what lies between ``<!-- results: NAME -->`` and ``<!-- /results: NAME -->`` in
    ``text`` by ``blocks[NAME]``, for every name; raises :class:`ConfigError` naming the
    markers to add when a pair is missing or out of order."""
    for name, block in blocks.items():
        start, end = f"<!-- results: {name} -->", f"<!-- /results: {name} -->"
        first, last = text.find(start), text.find(end)
        if first < 0 or last < first or text.count(start) != 1:
            raise ConfigError(
                f"{source}: needs exactly one pair of lines {start!r} ... {end!r} where the table "
                f"of {name} goes; add them and run again"
            )
        text = text[: first + len(start)] + "\n" + block.rstrip("\n") + "\n" + text[last:]
    return text


def results_tables(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, str]:
    """The Markdown table of each group of :func:`~nnrelief.reporting.seeds.seed_groups`, by
    name: :func:`results_markdown` for one file, :func:`~nnrelief.reporting.seeds.seeds_markdown`
    for runs that differ only by seed."""
    return {name: results_markdown(group[0]) if len(group) == 1 else seeds_markdown(group) for name, group in groups.items()}


_X_AXES = {
    "weights": ("remaining_percent", "remaining weights (%)", percent_axis),
    "macs": ("macs", "MACs of one input (unpruned weights)", count_axis),
}


def _line(axis: Any, points: Mapping[int, tuple[float, Spread]], **style: Any) -> Any:
    """Accuracy (percent) against x, with the standard deviation over seeds as error bars."""
    xs = [x for x, _ in points.values()]
    ys = [100 * spread.mean for _, spread in points.values()]
    if all(spread.n == 1 for _, spread in points.values()):
        return axis.plot(xs, ys, **style)[0]
    return axis.errorbar(xs, ys, yerr=[100 * spread.std for _, spread in points.values()], capsize=3, **style).lines[0]


def _points(group: Sequence[Mapping[str, Any]], method: str | None, key: str) -> dict[int, tuple[float, Spread]]:
    """Per iteration the mean x and the spread of the test accuracy (iterations with both)."""
    xs, accuracy = spreads(group, method, key), spreads(group, method, "test_accuracy")
    return {iteration: (xs[iteration].mean, accuracy[iteration]) for iteration in xs if iteration in accuracy}


def run_labels(groups: Mapping[str, Sequence[Mapping[str, Any]]], shown: int = 3) -> dict[str, str]:
    """A legend label per group of results files (by group name): ``model / dataset``, then
    what tells it from the other groups of the same model and dataset: the settings that
    differ among them (at most ``shown``), or its name when no setting differs; ``, n seeds``
    for a group of several seeds."""
    base = {name: f"{group[0]['model']} / {group[0]['dataset']}" for name, group in groups.items()}
    labels = {}
    for name, group in groups.items():
        twins = [groups[other][0]["settings"] for other in groups if base[other] == base[name]]
        settings = group[0]["settings"]
        differ = [key for key in settings if key not in _NOT_DISTINGUISHING and len({json.dumps(t.get(key)) for t in twins}) > 1]
        which = ", ".join(f"{key} {_setting(settings[key])}" for key in differ[:shown]) if differ else name
        labels[name] = base[name] + (f" ({which})" if len(twins) > 1 else "") + (f", {len(group)} seeds" if len(group) > 1 else "")
    return labels


def _setting(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def plot_results(groups: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike[str], *, x: str = "weights") -> Path:
    """Test accuracy against remaining weights (``x="weights"``) or MACs (``x="macs"``), log
    x, for each group of results files by name (one file, or runs that differ only by seed:
    their mean, the standard deviation as error bars): NNrelief's iterations as a line, each
    baseline method as its own line, labelled by :func:`run_labels`; dense accuracy dotted."""
    key, label, ticks = _X_AXES[x]
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    names = run_labels(groups)
    for group_name, group in groups.items():
        name = names[group_name]
        nnrelief = _points(group, None, key)
        line = _line(axis, nnrelief, marker="o", label=f"NNrelief, {name}")
        axis.axhline(100 * spreads(group, None, "test_accuracy")[0].mean, color=line.get_color(), linestyle=":", linewidth=1)
        for method in sorted({b["method"] for data in group for b in data["baselines"]}):
            _line(axis, _points(group, method, key), marker="s", linestyle="--", label=f"{method}, {name}")
    axis.set_xscale("log")
    axis.invert_xaxis()
    rows = [row for group in groups.values() for data in group for row in [*data["iterations"], *data["baselines"]]]
    ticks(axis.xaxis, [row[key] for row in rows if key in row])
    axis.set_xlabel(label)
    axis.set_ylabel("test accuracy (%)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    path = Path(path)
    save(fig, path)
    return path
