"""The record of an iterative run: one row per iteration, as a table, CSV and JSON."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..metrics import summarize


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_table(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, Mapping) and all(isinstance(k, str) and check(v) for k, v in value.items())


# What each stored field of an IterationRecord must be: (test, description).
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (_is_int, "an integer") for name in ("iteration", "params_remaining", "params_total", "macs_dense", "macs_sparse")},
    **{name: (_is_number, "a number") for name in ("prune_seconds", "retrain_seconds", "seconds")},
    **{name: (_is_table(_is_number), "an object of numbers") for name in ("accuracy_before", "accuracy_after")},
    **{name: (_is_table(_is_int), "an object of integers") for name in ("alive", "channels_total")},
    "report": (lambda value: value is None or isinstance(value, Mapping), "an object or null"),
}


@dataclass
class IterationRecord:
    """One row of the history: the model after iteration ``iteration`` (0 = dense).

    Attributes:
        iteration: 0 for the dense trained model, then 1, 2, ...
        accuracy_before: accuracy (fraction) per evaluation set right after the pruning
            pass, before retraining (for iteration 0: the dense model's accuracy).
        accuracy_after: accuracy per evaluation set after retraining.
        params_remaining: nonzero weights and biases of the Linear/conv layers.
        params_total: all weights and biases of those layers.
        alive: per layer, output neurons/filters with a nonzero weight or bias left.
        channels_total: per layer, all output neurons/filters.
        macs_dense: multiply-accumulates of one input counting every weight (the dense
            network's cost).
        macs_sparse: multiply-accumulates counting only nonzero (unpruned) weights.
        (Counts and MACs come from :func:`nnrelief.metrics.summarize` right after the
        pruning pass; retraining keeps the masks.)
        prune_seconds: wall time of the pruning pass.
        retrain_seconds: wall time of the training function.
        seconds: wall time of the whole iteration (pruning, evaluations, training, saving).
        report: the :class:`PruneReport` of the pass as a dict (``None`` for iteration 0).
    """

    iteration: int
    accuracy_before: dict[str, float]
    accuracy_after: dict[str, float]
    params_remaining: int
    params_total: int
    alive: dict[str, int]
    channels_total: dict[str, int]
    macs_dense: int
    macs_sparse: int
    prune_seconds: float = 0.0
    retrain_seconds: float = 0.0
    seconds: float = 0.0
    report: dict[str, Any] | None = None

    @property
    def remaining_percent(self) -> float:
        """Remaining weights and biases in percent of the dense count."""
        return 100.0 * self.params_remaining / self.params_total if self.params_total else 100.0

    @property
    def compression(self) -> float:
        """Dense count / remaining count (``inf`` when nothing is left)."""
        return self.params_total / self.params_remaining if self.params_remaining else float("inf")

    def flat(self) -> dict[str, Any]:
        """The record as one flat CSV row (accuracies ``<set>_acc_before/after``,
        alive counts ``alive:<layer>``)."""
        row: dict[str, Any] = {"iteration": self.iteration}
        for name in self.accuracy_after:
            row[f"{name}_acc_before"] = self.accuracy_before[name]
            row[f"{name}_acc_after"] = self.accuracy_after[name]
        row.update(
            params_remaining=self.params_remaining,
            params_total=self.params_total,
            remaining_percent=self.remaining_percent,
            compression=self.compression,
            macs_dense=self.macs_dense,
            macs_sparse=self.macs_sparse,
        )
        row.update({f"alive:{name}": count for name, count in self.alive.items()})
        row.update(
            prune_seconds=self.prune_seconds,
            retrain_seconds=self.retrain_seconds,
            seconds=self.seconds,
        )
        return row

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields plus ``remaining_percent`` and ``compression``."""
        data = dataclasses.asdict(self)
        data["remaining_percent"] = self.remaining_percent
        data["compression"] = _finite(self.compression)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IterationRecord:
        """Inverse of :meth:`to_dict`; ``ValueError`` naming the field that is missing or of
        the wrong type."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an iteration must be an object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, (test, description) in _FIELD_TYPES.items():
            if name not in data:
                if fields[name].default is dataclasses.MISSING:
                    raise ValueError(f"an iteration lacks {name!r}")
            elif not test(data[name]):
                raise ValueError(f"{name!r} of an iteration must be {description}, got {data[name]!r:.40}")
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclass
class History:
    """All iterations of a :func:`relieve` run.

    Attributes:
        records: one :class:`IterationRecord` per iteration, starting with the dense model.
        stopped_early: the loop stopped because the accuracy fell below the margin.
        selected_iteration: iteration whose weights the model holds at the end (the last
            one, or the last within the early-stopping margin).
    """

    records: list[IterationRecord] = field(default_factory=list)
    stopped_early: bool = False
    selected_iteration: int = 0

    def columns(self) -> list[str]:
        """CSV column names (those of the first record)."""
        return list(self.records[0].flat()) if self.records else []

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "stopped_early": self.stopped_early,
            "selected_iteration": self.selected_iteration,
            "columns": self.columns(),
            "iterations": [r.to_dict() for r in self.records],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """Inverse of :meth:`to_dict`; ``ValueError`` saying what does not fit."""
        if not isinstance(data, Mapping) or not isinstance(data.get("iterations"), list):
            raise ValueError("a history must be an object with a list of 'iterations'")
        records = []
        for index, row in enumerate(data["iterations"]):
            try:
                records.append(IterationRecord.from_dict(row))
            except ValueError as error:
                raise ValueError(f"iterations[{index}]: {error}") from None
        if [r.iteration for r in records] != list(range(len(records))):
            raise ValueError("the iterations must be numbered 0, 1, 2, ...")
        selected, stopped = data.get("selected_iteration"), data.get("stopped_early")
        if not isinstance(stopped, bool) or not _is_int(selected) or not 0 <= selected < max(len(records), 1):
            raise ValueError(f"'stopped_early' must be true/false and 'selected_iteration' one of the iterations, got "
                             f"{stopped!r} and {selected!r}")  # fmt: skip
        return cls(records=records, stopped_early=stopped, selected_iteration=selected)

    def to_csv(self) -> str:
        """The history as CSV text, one row per iteration."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        for record in self.records:
            writer.writerow(record.flat())
        return out.getvalue()

    def to_json(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The content of ``history.json``: :meth:`to_dict` plus the ``extra`` keys."""
        return {**(extra or {}), **self.to_dict()}

    def table(self) -> str:
        """A fixed-width text table of the iterations (accuracies in percent)."""
        if not self.records:
            return "(no iterations)"
        sets = list(self.records[0].accuracy_after)
        layers = list(self.records[0].alive)
        per_layer = len(layers) <= 6
        header = ["iter"]
        for name in sets:
            header += [f"{name} before", f"{name} after"]
        header += ["remaining", "compr.", "MACs dense", "MACs sparse"]
        header += ["alive " + "-".join(layers) if per_layer else "alive channels", "time"]
        rows = []
        for r in self.records:
            row = [str(r.iteration)]
            for name in sets:
                before = "-" if r.iteration == 0 else f"{100 * r.accuracy_before[name]:.2f}%"
                row += [before, f"{100 * r.accuracy_after[name]:.2f}%"]
            row += [
                f"{r.remaining_percent:.2f}%",
                f"{r.compression:.2f}x",
                _human(r.macs_dense),
                _human(r.macs_sparse),
                "-".join(str(r.alive[n]) for n in layers)
                if per_layer
                else f"{sum(r.alive.values())}/{sum(r.channels_total.values())}",
                f"{r.seconds:.1f}s",
            ]
            rows.append(row)
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
        if self.stopped_early:
            lines.append(
                f"stopped early: accuracy fell below the margin; selected iteration "
                f"{self.selected_iteration}"
            )
        return "\n".join(lines)


def _human(count: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(int(count))


def measure(model: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    """The counts and MACs of an :class:`IterationRecord` for ``model`` on inputs of ``shape``."""
    summary = summarize(model, shape)
    return {
        "params_remaining": summary.params_nonzero,
        "params_total": summary.params_total,
        "alive": summary.architecture(),
        "channels_total": {layer.name: layer.channels_total for layer in summary.layers},
        "macs_dense": summary.macs_dense,
        "macs_sparse": summary.macs_sparse,
    }

