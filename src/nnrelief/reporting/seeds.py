"""Runs that differ only by seed: results files grouped (:func:`seed_groups`), their mean
and spread per iteration (:func:`spreads`) and a table of them (:func:`seeds_markdown`).

Two results files belong together when their ``settings`` are equal but for ``seed`` and
the settings that do not change a run's results (:data:`~nnrelief.experiments.config.FREE_FIELDS`:
data folder, device, planned iterations, processes). The spread is the sample standard
deviation (n - 1 in the denominator) and the range over the runs that reached an iteration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..experiments.config import FREE_FIELDS

__all__ = ["Spread", "seed_groups", "seeds_markdown", "spreads"]

_NOT_COMPARED = FREE_FIELDS | {"seed"}


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (0 for one value), least and largest of ``n`` values."""

    mean: float
    std: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of ``values`` (at least one)."""
        if not values:
            raise ValueError("no values to spread")
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return cls(mean, std, min(values), max(values), n)

    def text(self, scale: float = 1.0) -> str:
        """``mean ± std [low, high]`` times ``scale``, two decimals; the value alone for one run."""
        if self.n == 1:
            return f"{scale * self.mean:.2f}"
        return f"{scale * self.mean:.2f} ± {scale * self.std:.2f} [{scale * self.low:.2f}, {scale * self.high:.2f}]"


def _key(results: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in results["settings"].items() if k not in _NOT_COMPARED}, sort_keys=True)


def seed_groups(named: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The results by name (a file's name without ``.json``), grouped by their settings but
    the seed, in the order the groups first appear. A group's name is its file's name, or
    its files' names joined by ``+`` (``a+b+c``)."""
    groups: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for name, results in named.items():
        groups.setdefault(_key(results), []).append((name, results))
    return {"+".join(name for name, _ in members): [results for _, results in members] for members in groups.values()}


def _rows(results: Mapping[str, Any], method: str | None) -> list[Mapping[str, Any]]:
    if method is None:
        return results["iterations"]
    return [row for row in results["baselines"] if row["method"] == method]


def spreads(group: Sequence[Mapping[str, Any]], method: str | None, key: str) -> dict[int, Spread]:
    """Per iteration, the spread of ``key`` (e.g. ``test_accuracy``, ``remaining_percent``,
    ``macs``) over the runs of ``group``: of NNrelief's iterations (``method`` None) or of the
    baseline ``method``'s rows; rows without ``key`` are left out. Iterations in order."""
    values: dict[int, list[float]] = {}
    for results in group:
        for row in _rows(results, method):
            if key in row:
                values.setdefault(row["iteration"], []).append(row[key])
    return {iteration: Spread.of(values[iteration]) for iteration in sorted(values)}


def _methods(group: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({row["method"] for results in group for row in results["baselines"]})


def _cell(spread: Mapping[int, Spread], iteration: int, n: int, scale: float) -> str:
    if iteration not in spread:
        return "-"
    value = spread[iteration]
    return value.text(scale) + (f" (n={value.n})" if value.n != n else "")


def seeds_markdown(group: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of runs that differ only by seed: per iteration the number of runs
    that reached it, and for NNrelief and each baseline the remaining weights and the test
    accuracy after retraining as mean ± standard deviation [least, largest]."""
    first = group[0]
    seeds = ", ".join(str(results["settings"].get("seed")) for results in group)
    devices = ", ".join(dict.fromkeys(str(results["device"]) for results in group))
    minutes = sum(results["wall_time_s"] for results in group) / 60
    columns = [("NNrelief", None), *((method, method) for method in _methods(group))]
    lines = [
        f"**{first['model']} on {first['dataset']}**, seeds {seeds} ({devices}, wall time {minutes:.0f} min in all): "
        "mean ± standard deviation [least, largest] over the seeds",
        "",
        "| iter | n | " + " | ".join(f"{label} remaining (%) | {label} test (%)" for label, _ in columns) + " |",
        "|" + "---:|" * (2 + 2 * len(columns)),
    ]
    remaining = {label: spreads(group, method, "remaining_percent") for label, method in columns}
    accuracy = {label: spreads(group, method, "test_accuracy") for label, method in columns}
    for iteration, reference in remaining["NNrelief"].items():
        cells = [str(iteration), str(reference.n)]
        for label, _ in columns:
            cells.append(_cell(remaining[label], iteration, reference.n, 1.0))
            cells.append(_cell(accuracy[label], iteration, reference.n, 100.0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
