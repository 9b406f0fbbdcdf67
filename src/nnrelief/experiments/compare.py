"""NNrelief against other pruning methods at equal remaining weights or equal MACs.

:func:`run_comparison` takes an :class:`~nnrelief.experiments.experiment.Experiment` and runs, from the
same dense trained weights (``trained.pt``) and with the same retraining (rewind or
fine-tune, same epochs, batches and seeds per iteration), the methods of the registry
:data:`~nnrelief.experiments.methods.METHODS` (``nnrelief`` is the experiment itself,
:meth:`Experiment.run`; an existing run in the same folder is reused and continued; every
other method prunes at every iteration to what NNrelief reached there):

{methods}

NNrelief always runs, since its counts are the targets of the others. The baselines need
no pruning set. Files (under ``<run folder>/compare``, all written atomically)::

    <method>/                   the method's run (the files of a run folder: relief_state.pt,
                                model-iter<k>.pt, history.csv/.json, retrain-<k>.ckpt)
    compare.csv                 one row per method and iteration
    compare.json                the same rows plus the settings
    compare.md                  test accuracy per iteration, one column per method; remaining
                                weights and MACs per method

(``nnrelief compare`` adds the figures, :mod:`nnrelief.reporting.accuracy`.) An interrupted
comparison continues after the last finished iteration of each method (and inside a
retraining, after its last finished epoch) when run again.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import runfolder as files
from .config import ConfigError, ExperimentConfig
from .experiment import Experiment
from .history import History, IterationRecord
from .iterative import relieve
from .methods import METHODS, Targets, get_method, layer_targets, with_method_list
from .runfolder import RunFolder

__all__ = ["BASELINES", "DEFAULT_METHODS", "Comparison", "markdown_heading", "run_baseline", "run_comparison"]

__doc__ = with_method_list(__doc__)

logger = logging.getLogger(__name__)

BASELINES = tuple(name for name, method in METHODS.items() if method.prune is not None)
"""Every method but ``nnrelief`` (the reference whose counts and MACs the others follow)."""
DEFAULT_METHODS = tuple(name for name, method in METHODS.items() if method.default)
"""The methods run when none are named: all but those that need a kind of model (``l1-filter``)."""
COMPARE_DIR = "compare"


def run_baseline(
    experiment: Experiment, method: str, reference: History, folder: Path, *, progress: bool = True
) -> History:
    """Run baseline ``method`` along the iterations of the NNrelief history ``reference``.

    Starts from the experiment's dense trained weights; at iteration k prunes to the
    targets of ``reference.records[k]`` (:class:`~nnrelief.experiments.methods.Targets`:
    per-layer counts, total count or MACs, as the method says), evaluates, rewinds if the
    experiment does, retrains exactly like NNrelief's iteration k and evaluates again:
    :func:`relieve` with the method's prune step, in ``folder`` (a run folder of its own,
    resumable like any run).
    """
    cfg = experiment.cfg
    shape = tuple(experiment.train_set.image_shape)
    step = get_method(method).step(Targets.of(reference, cfg.seed, shape), experiment.pruning_batches)
    method_folder = RunFolder(folder)

    def finished(record: IterationRecord) -> None:
        method_folder.remove(files.retrain_checkpoint(record.iteration))
        logger.info(
            "%s iteration %d: test accuracy %.4f before / %.4f after retraining, %d/%d weights, %d MACs",
            method, record.iteration, record.accuracy_before["test"], record.accuracy_after["test"],
            record.params_remaining, record.params_total, record.macs_sparse,
        )  # fmt: skip

    return relieve(
        experiment.train_dense(),
        prune_step=step,
        step_settings={"method": method, "seed": cfg.seed},
        train_fn=lambda model, iteration: experiment.retrain(model, iteration, method_folder, method),
        eval_fns=experiment.eval_fns(),
        num_iters=len(reference.records) - 1,
        rewind_state=experiment.initial_state(),
        run_dir=folder,
        input_shape=shape,
        progress=progress,
        progress_label=method,
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

    def curves(self, x: str = "weights") -> dict[str, list[tuple[float, float, float]]]:
        """Per method and iteration ``(x, test accuracy after retraining, right after
        pruning)``, accuracies in percent; ``x`` is the remaining weights in percent
        (``"weights"``) or the sparse MACs (``"macs"``)."""
        if x not in ("weights", "macs"):
            raise ValueError(f"x must be 'weights' or 'macs', got {x!r}")
        return {
            method: [(r.remaining_percent if x == "weights" else float(r.macs_sparse),
                      100 * r.accuracy_after["test"], 100 * r.accuracy_before["test"]) for r in history.records]
            for method, history in self.histories.items()
        }  # fmt: skip

    def markdown(self) -> str:
        """Test accuracy per iteration (rows) and method (columns), after retraining and
        right after pruning, then remaining weights and MACs per method, as Markdown tables."""
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
        lines += ["Remaining weights (%) / MACs (unpruned weights, one input):", ""]
        lines += ["| iter | " + " | ".join(methods) + " |", "|" + "---:|" * (1 + len(methods))]
        for k, ref in enumerate(reference):
            cells = [str(ref.iteration)]
            for method in methods:
                records = self.histories[method].records
                cells.append(f"{records[k].remaining_percent:.2f} / {records[k].macs_sparse:,}" if k < len(records) else "-")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self) -> dict[str, Path]:
        """Write ``compare.csv``, ``compare.json`` and ``compare.md`` (:meth:`write_markdown`
        without figures). Returns the written paths."""
        folder = self.folder
        rows = self.rows()
        columns = list(dict.fromkeys(key for row in rows for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        out = RunFolder(folder)
        out.write_text("compare.csv", text.getvalue())
        cfg = self.experiment.cfg
        payload = {"run_dir": str(self.experiment.run_dir), "config": cfg.to_dict(), "methods": list(self.histories),
                   "layer_totals": self.layer_totals(), "rows": rows}  # fmt: skip
        out.write_json("compare.json", payload)
        return {"csv": folder / "compare.csv", "json": folder / "compare.json", "md": self.write_markdown()}

    def write_markdown(self, figures: Mapping[str, str] | None = None) -> Path:
        """Write ``compare.md``: the settings, what each method prunes to, the ``figures``
        (file name in the comparison folder -> alt text) and :meth:`markdown`."""
        lines = [*markdown_heading(self.experiment.cfg, list(self.histories)), ""]
        for name, alt in (figures or {}).items():
            lines += [f"![{alt}]({name})", ""]
        path = self.folder / "compare.md"
        RunFolder(self.folder).write_text(path.name, "\n".join(lines) + "\n" + self.markdown())
        return path


def markdown_heading(cfg: ExperimentConfig, methods: Sequence[str]) -> list[str]:
    """The head of ``compare.md``: a title naming what the baselines that ran keep equal
    (remaining weights, MACs), the settings, and one line per baseline on what it prunes to."""
    baselines = [get_method(name) for name in methods if name != "nnrelief"]
    equal = sorted({method.equal for method in baselines}, key=["weights", "MACs"].index)
    title = "NNrelief's " + " or ".join("remaining weights" if what == "weights" else "MACs" for what in equal)
    epochs = f"{cfg.retrain_epochs} retraining epoch{'' if cfg.retrain_epochs == 1 else 's'}"
    retrain = "rewind to init" if cfg.rewind else "fine-tune"
    lines = [
        f"# Pruning methods at {title}" if baselines else "# NNrelief alone (no baseline ran)", "",
        (f"{cfg.model} on {cfg.dataset}, {cfg.optimizer}, seed {cfg.seed}; {epochs} per iteration ({retrain}); "
         f"NNrelief alpha_fc {cfg.alpha_fc:g}, alpha_conv {cfg.alpha_conv:g}."),
    ]  # fmt: skip
    if baselines:
        lines[-1] += " All start from the same dense weights and retrain identically; at every iteration they prune to:"
        lines += ["", *(f"* {method.name}: {method.matches}" for method in baselines)]
    return lines


def run_comparison(
    experiment: Experiment, methods: Sequence[str] = DEFAULT_METHODS, *, progress: bool = True
) -> Comparison:
    """Run NNrelief (the experiment) and the given baselines, and write the comparison
    files into ``<run folder>/compare`` (see the module docstring). An unknown method, or
    one that cannot prune the experiment's model, is refused before anything runs."""
    for name in methods:
        get_method(name)
    experiment.require_classifier("comparing pruning methods")
    shape = tuple(experiment.train_set.image_shape)
    for name in methods:
        check = get_method(name).check
        if check is not None:
            try:
                check(experiment.initial_model(), shape)
            except ValueError as error:
                raise ConfigError(f"method {name} cannot prune {experiment.cfg.model}: {error}") from None
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
