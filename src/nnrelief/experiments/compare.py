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

    <method>/                   the method's run (the files of a run folder: relief_state.pt,
                                model-iter<k>.pt, history.csv/.json, retrain-<k>.ckpt)
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
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..report import PruneReport
from . import runfolder as files
from .baselines import global_magnitude_prune, magnitude_prune, random_prune
from .config import ConfigError, derive_seed
from .experiment import Experiment
from .history import History, IterationRecord
from .iterative import PruneStep, relieve
from .runfolder import RunFolder

__all__ = ["BASELINES", "METHODS", "Comparison", "layer_targets", "run_baseline", "run_comparison"]

logger = logging.getLogger(__name__)

METHODS = ("nnrelief", "magnitude", "global-magnitude", "random")
"""All methods; ``nnrelief`` is the reference whose counts the others follow."""
BASELINES = METHODS[1:]
COMPARE_DIR = "compare"


def layer_targets(record: IterationRecord) -> dict[str, int]:
    """Remaining weights + biases per layer after the pruning pass of ``record``."""
    if record.report is None:
        raise ValueError(f"iteration {record.iteration} has no pruning report (the dense model)")
    return {layer["name"]: layer["weights_kept"] + layer["bias_kept"] for layer in record.report["layers"]}


def baseline_step(method: str, targets: Sequence[Mapping[str, int]], seed: int) -> PruneStep:
    """The prune step of baseline ``method`` whose iteration k prunes to ``targets[k - 1]``
    (per layer, or in total for ``global-magnitude``)."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")

    def step(model: nn.Module, iteration: int) -> PruneReport:
        kept = targets[iteration - 1]
        if method == "magnitude":
            return magnitude_prune(model, kept)
        if method == "global-magnitude":
            return global_magnitude_prune(model, sum(kept.values()), list(kept))
        generator = torch.Generator().manual_seed(derive_seed(seed, "random-prune", iteration))
        return random_prune(model, kept, generator)

    return step


def run_baseline(
    experiment: Experiment, method: str, reference: History, folder: Path, *, progress: bool = True
) -> History:
    """Run baseline ``method`` along the iterations of the NNrelief history ``reference``.

    Starts from the experiment's dense trained weights; at iteration k prunes to the
    counts of ``reference.records[k]`` (per layer, or in total for ``global-magnitude``),
    evaluates, rewinds if the experiment does, retrains exactly like NNrelief's iteration
    k and evaluates again: :func:`relieve` with the baseline's prune step, in ``folder``
    (a run folder of its own, resumable like any run).
    """
    cfg = experiment.cfg
    targets = [layer_targets(record) for record in reference.records[1:]]
    method_folder = RunFolder(folder)

    def finished(record: IterationRecord) -> None:
        method_folder.remove(files.retrain_checkpoint(record.iteration))
        logger.info(
            "%s iteration %d: test accuracy %.4f before / %.4f after retraining, %d/%d weights",
            method, record.iteration, record.accuracy_before["test"], record.accuracy_after["test"],
            record.params_remaining, record.params_total,
        )  # fmt: skip

    return relieve(
        experiment.train_dense(),
        prune_step=baseline_step(method, targets, cfg.seed),
        step_settings={"method": method, "seed": cfg.seed},
        train_fn=lambda model, iteration: experiment.retrain(model, iteration, method_folder, method),
        eval_fns=experiment.eval_fns(),
        num_iters=len(targets),
        rewind_state=experiment.initial_state(),
        run_dir=folder,
        input_shape=tuple(experiment.train_set.image_shape),
        progress=progress,
        on_iteration_end=finished,
        history_extra={"method": method, "config": cfg.to_dict()},
    )


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
        out = RunFolder(folder)
        out.write_text(paths["csv"].name, text.getvalue())
        cfg = self.experiment.cfg
        payload = {"run_dir": str(self.experiment.run_dir), "config": cfg.to_dict(), "methods": list(self.histories),
                   "layer_totals": self.layer_totals(), "rows": rows}  # fmt: skip
        out.write_json(paths["json"].name, payload)
        retrain = "rewind to init" if cfg.rewind else "fine-tune"
        header = [
            "# Pruning methods at equal remaining weights", "",
            (f"{cfg.model} on {cfg.dataset}, {cfg.optimizer}, seed {cfg.seed}; {cfg.retrain_epochs} retraining "
             f"epochs per iteration ({retrain}); NNrelief alpha_fc {cfg.alpha_fc:g}, alpha_conv {cfg.alpha_conv:g}. "
             "magnitude and random prune every layer to NNrelief's remaining count of that layer, global-magnitude "
             "to NNrelief's total; all start from the same dense weights and retrain identically."), "",
        ]  # fmt: skip
        try:
            from ..reporting import MissingPlotDependencyError, plot_comparison

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
        out.write_text(paths["md"].name, "\n".join(header) + "\n" + self.markdown())
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
    RunFolder(experiment.run_dir / COMPARE_DIR).remove_temporary()  # under the run's lock
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
