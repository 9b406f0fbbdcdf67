"""NNrelief against magnitude and random pruning at equal remaining weights.

:func:`run_comparison` takes an :class:`~nnrelief.experiments.experiment.Experiment` and runs, from the
same dense trained weights (``trained.pt``) and with the same retraining (rewind or
fine-tune, same epochs, batches and seeds per iteration):

* ``nnrelief`` - the experiment itself (:meth:`Experiment.run`; an existing run in the same
  folder is reused and continued);
* ``magnitude`` - iterative layer-wise magnitude pruning (Han et al., 2015) down to
  NNrelief's remaining count of every layer at every iteration;
* ``global-magnitude`` - magnitude pruning over all layers together down to NNrelief's
  total remaining count at every iteration;
* ``random`` - random pruning down to NNrelief's per-layer counts.

NNrelief always runs, since its counts are the targets of the others. The baselines need
no pruning set. Files (under ``<run folder>/compare``, all written atomically)::

    <method>/state.pt           loop state after the last finished iteration (resume point)
    <method>/model-iter<k>.pt   weights and masks after iteration k
    <method>/history.csv/.json  the method's history (same format as a run's)
    <method>/retrain-<k>.ckpt   per-epoch checkpoint of the running retraining (removed)
    compare.csv                 one row per method and iteration
    compare.json                the same rows plus the settings
    compare.md                  test accuracy per iteration, one column per method
    compare.png                 test accuracy vs remaining weights (log x), one line per method

An interrupted comparison continues after the last finished iteration of each method (and
inside a retraining, after its last finished epoch) when run again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import cpu_state, save_text, save_torch
from ..masks import refresh_masked, restore_masks
from ..report import PruneReport
from ..training import fit
from .baselines import global_magnitude_prune, magnitude_prune, random_prune
from .experiment import ConfigError, Experiment, derive_seed
from .history import History, IterationRecord, measure
from .iterative import rewind

__all__ = ["BASELINES", "METHODS", "Comparison", "layer_targets", "run_baseline", "run_comparison"]

logger = logging.getLogger(__name__)

METHODS = ("nnrelief", "magnitude", "global-magnitude", "random")
"""All methods; ``nnrelief`` is the reference whose counts the others follow."""
BASELINES = METHODS[1:]
COMPARE_DIR = "compare"
_STATE_FORMAT = 1


def layer_targets(record: IterationRecord) -> dict[str, int]:
    """Remaining weights + biases per layer after the pruning pass of ``record``."""
    if record.report is None:
        raise ValueError(f"iteration {record.iteration} has no pruning report (the dense model)")
    return {layer["name"]: layer["weights_kept"] + layer["bias_kept"] for layer in record.report["layers"]}


def _prune(method: str, model: nn.Module, targets: dict[str, int], seed: int, iteration: int) -> PruneReport:
    if method == "magnitude":
        return magnitude_prune(model, targets)
    if method == "global-magnitude":
        return global_magnitude_prune(model, sum(targets.values()), list(targets))
    if method == "random":
        generator = torch.Generator().manual_seed(derive_seed(seed, "random-prune", iteration))
        return random_prune(model, targets, generator)
    raise ValueError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")


def run_baseline(
    experiment: Experiment, method: str, reference: History, folder: Path, *, progress: bool = True
) -> History:
    """Run baseline ``method`` along the iterations of the NNrelief history ``reference``.

    Starts from the experiment's dense trained weights; at iteration k prunes to the
    counts of ``reference.records[k]`` (per layer, or in total for ``global-magnitude``),
    evaluates, rewinds if the experiment does, retrains exactly like NNrelief's iteration
    k and evaluates again. State is stored in ``folder`` after every iteration and an
    interrupted run resumes from it.
    """
    cfg = experiment.cfg
    targets = [layer_targets(record) for record in reference.records[1:]]
    shape = tuple(experiment.train_set.image_shape)
    init = torch.load(experiment.run_dir / "init.pt", map_location="cpu", weights_only=True) if cfg.rewind else None
    model = experiment.train_dense()
    state_path = folder / "state.pt"
    extra = {"method": method, "config": cfg.to_dict()}
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        done = len(state["targets"])
        if state.get("format") != _STATE_FORMAT or state["method"] != method or state["targets"] != targets[:done]:
            raise ConfigError(f"{state_path} belongs to another comparison; delete {folder} to start it again")
        restore_masks(model, state["model"])
        history = History.from_dict(state["history"])
        logger.info("%s: resuming after iteration %d", method, done)
    else:
        accuracy = experiment.accuracies(model)
        history = History([IterationRecord(0, dict(accuracy), dict(accuracy), **measure(model, shape))])
        _store(folder, model, history, [], method, extra)
    for iteration in range(len(history.records), len(targets) + 1):
        start = time.perf_counter()
        report = _prune(method, model, targets[iteration - 1], cfg.seed, iteration)
        prune_seconds = time.perf_counter() - start
        record = IterationRecord(iteration, experiment.accuracies(model), {}, **measure(model, shape),
                                 prune_seconds=prune_seconds, report=report.to_dict())  # fmt: skip
        retrain_start = time.perf_counter()
        if init is not None:
            rewind(model, init)
        checkpoint = folder / f"retrain-{iteration}.ckpt"
        fit(model, experiment.train_loader("retrain", iteration), experiment.val_batches,
            cfg.train_config(retrain_iteration=iteration), checkpoint_path=checkpoint, progress=progress)  # fmt: skip
        refresh_masked(model)
        record.retrain_seconds = time.perf_counter() - retrain_start
        record.accuracy_after = experiment.accuracies(model)
        record.seconds = time.perf_counter() - start
        history.records.append(record)
        history.selected_iteration = iteration
        _store(folder, model, history, targets[:iteration], method, extra)
        checkpoint.unlink(missing_ok=True)
        logger.info(
            "%s iteration %d: test accuracy %.4f before / %.4f after retraining, %d/%d weights",
            method, iteration, record.accuracy_before["test"], record.accuracy_after["test"],
            record.params_remaining, record.params_total,
        )  # fmt: skip
    return history


def _store(folder: Path, model: nn.Module, history: History, targets: list[dict[str, int]], method: str,
           extra: dict[str, Any]) -> None:  # fmt: skip
    """Weights of the last iteration, history files, then the state (the commit point)."""
    weights = cpu_state(model)
    save_torch(weights, folder / f"model-iter{history.records[-1].iteration}.pt")
    history.write(folder, extra)
    state = {"format": _STATE_FORMAT, "method": method, "targets": targets, "model": weights,
             "history": history.to_dict()}  # fmt: skip
    save_torch(state, folder / "state.pt")


@dataclass
class Comparison:
    """The histories of all methods of one comparison.

    Attributes:
        experiment: the experiment (settings, run folder).
        histories: per method, its history; ``nnrelief`` first.
    """

    experiment: Experiment
    histories: dict[str, History]

    @property
    def folder(self) -> Path:
        """Where the comparison's files live: ``<run folder>/compare``."""
        return self.experiment.run_dir / COMPARE_DIR

    def layer_totals(self) -> dict[str, int]:
        """All weights + biases per pruned layer."""
        report = self.histories["nnrelief"].records[1].report if len(self.histories["nnrelief"].records) > 1 else None
        if report is None:
            return {}
        return {layer["name"]: layer["weights_total"] + layer["bias_total"] for layer in report["layers"]}

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per method and iteration: accuracies (fractions), remaining
        weights, MACs, and per layer the kept entries (``kept:<layer>``) and alive
        neurons (``alive:<layer>``)."""
        totals = self.layer_totals()
        rows = []
        for method, history in self.histories.items():
            for record in history.records:
                kept = layer_targets(record) if record.report is not None else dict(totals)
                row: dict[str, Any] = {"method": method, "iteration": record.iteration}
                for name in record.accuracy_after:
                    row[f"{name}_acc_before"] = record.accuracy_before[name]
                    row[f"{name}_acc_after"] = record.accuracy_after[name]
                row.update(
                    params_remaining=record.params_remaining, params_total=record.params_total,
                    remaining_percent=record.remaining_percent, macs_sparse=record.macs_sparse,
                )  # fmt: skip
                row.update({f"kept:{name}": count for name, count in kept.items()})
                row.update({f"alive:{name}": count for name, count in record.alive.items()})
                rows.append(row)
        return rows

    def markdown(self) -> str:
        """Test accuracy per iteration (rows) and method (columns), after retraining and
        right after pruning, as Markdown tables."""
        methods = list(self.histories)
        reference = self.histories["nnrelief"].records
        lines = []
        for title, which in (("after retraining", "accuracy_after"), ("right after pruning", "accuracy_before")):
            lines += [f"Test accuracy (%) {title}:", ""]
            lines.append("| iter | remaining | remaining % | " + " | ".join(methods) + " |")
            lines.append("|" + "---:|" * (3 + len(methods)))
            for k, ref in enumerate(reference):
                cells = [str(ref.iteration), f"{ref.params_remaining:,}", f"{ref.remaining_percent:.2f}"]
                for method in methods:
                    records = self.histories[method].records
                    cells.append(f"{100 * getattr(records[k], which)['test']:.2f}" if k < len(records) else "-")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)

    def write(self) -> dict[str, Path]:
        """Write ``compare.csv``, ``compare.json``, ``compare.md`` and ``compare.png``
        (the figure only if matplotlib is installed). Returns the written paths."""
        folder = self.folder
        rows = self.rows()
        columns = list(dict.fromkeys(key for row in rows for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        paths = {"csv": folder / "compare.csv", "json": folder / "compare.json", "md": folder / "compare.md"}
        save_text(text.getvalue(), paths["csv"])
        cfg = self.experiment.cfg
        payload = {"run_dir": str(self.experiment.run_dir), "config": cfg.to_dict(), "methods": list(self.histories),
                   "layer_totals": self.layer_totals(), "rows": rows}  # fmt: skip
        save_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", paths["json"])
        retrain = "rewind to init" if cfg.rewind else "fine-tune"
        header = [
            "# Pruning methods at equal remaining weights", "",
            (f"{cfg.model} on {cfg.dataset}, {cfg.optimizer}, seed {cfg.seed}; {cfg.retrain_epochs} retraining "
             f"epochs per iteration ({retrain}); NNrelief alpha_fc {cfg.alpha_fc:g}, alpha_conv {cfg.alpha_conv:g}. "
             "magnitude and random prune every layer to NNrelief's remaining count of that layer, global-magnitude "
             "to NNrelief's total; all start from the same dense weights and retrain identically."), "",
        ]  # fmt: skip
        try:
            from ..plots import MissingPlotDependencyError, plot_comparison

            curves = {
                method: [(r.remaining_percent, 100 * r.accuracy_after["test"], 100 * r.accuracy_before["test"])
                         for r in history.records]
                for method, history in self.histories.items()
            }  # fmt: skip
            paths["png"] = folder / "compare.png"
            plot_comparison(curves, paths["png"], title=f"{cfg.model} on {cfg.dataset}, {cfg.optimizer}, seed {cfg.seed}")
            header += ["![test accuracy vs remaining weights](compare.png)", ""]
        except MissingPlotDependencyError as error:
            paths.pop("png")
            logger.warning("no compare.png: %s", error)
        save_text("\n".join(header) + "\n" + self.markdown(), paths["md"])
        return paths


def run_comparison(
    experiment: Experiment, methods: Sequence[str] = METHODS, *, progress: bool = True
) -> Comparison:
    """Run NNrelief (the experiment) and the given baselines, and write the comparison
    files into ``<run folder>/compare`` (see the module docstring)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    reference = experiment.run()
    limit = experiment.cfg.num_iters
    if reference.records[-1].iteration > limit:  # the run folder holds a longer run
        reference = History(reference.records[: limit + 1], reference.stopped_early, min(reference.selected_iteration, limit))
    histories = {"nnrelief": reference}
    for method in BASELINES:
        if method in methods:
            logger.info("baseline %s", method)
            histories[method] = run_baseline(experiment, method, reference, experiment.run_dir / COMPARE_DIR / method,
                                             progress=progress)  # fmt: skip
    comparison = Comparison(experiment, histories)
    comparison.write()
    return comparison
