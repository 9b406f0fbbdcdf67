"""The Markdown report of run folders (``nnrelief report``): every figure plus the
per-iteration tables (:func:`write_report`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..analysis import analyse
from ..experiments import runfolder as files
from ..experiments.config import ConfigError, ExperimentConfig
from ..experiments.experiment import load_weights, run_data_dir
from ..experiments.history import History
from ..fileio import save_text
from ..inputs import ModelInput
from ..modelfile import ModelEvaluation
from .accuracy import plot_accuracy
from .architecture import plot_architecture
from .connections import connection_scores, plot_connections, pruning_inputs
from .models import model_markdown
from .runs import RunData, load_run

logger = logging.getLogger(__name__)


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
    models: Sequence[ModelEvaluation] = (),
) -> Path:
    """Draw the figures of the given run folders into ``out_dir`` and write ``report.md``.

    Per run: the connection picture (dense = ``model-iter0.pt`` vs ``iteration``, default
    the run's selected one; scores on ``samples`` training images of the run's dataset,
    read from ``data_dir`` or the run's), the architecture figure and the per-iteration
    table. For all runs together: the accuracy / remaining-weights figure. A run whose
    connection picture cannot be drawn (dataset missing, model not a chain of layers) gets
    a note instead. Then a section per evaluated model file of ``models``
    (:func:`~nnrelief.modelfile.evaluate_model_file`). Returns the path of ``report.md``.
    """
    runs = [load_run(path) for path in run_dirs]
    if not runs and not models:
        raise ValueError("write_report needs at least one run folder or model file")
    _check_choices(runs, iteration, samples)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefixes = _prefixes(runs)
    lines = ["# NNrelief report", ""]
    if runs:
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
        except (ValueError, OSError) as error:
            logger.warning("%s: no connection picture: %s", run.name, error)
            lines += ["### Connections before and after pruning", "", f"(not drawn: {error})", ""]
        name = f"{prefix}architecture.png"
        caption = plot_architecture(run, out / name)
        lines += ["### Architecture", "", f"![architecture]({name})", "", caption, ""]
        lines += ["### Iterations", "", history_markdown(run.history), "",
                  ("Accuracies in percent (validation split held out from the training data; test set). "
                   "'before' = right after the pruning pass, 'after' = after retraining."), ""]  # fmt: skip
    for evaluation in models:
        lines += [model_markdown(evaluation), ""]
    path = out / "report.md"
    save_text("\n".join(lines) + "\n", path)
    logger.info("wrote %s", path)
    return path


def _check_choices(runs: Sequence[RunData], iteration: int | None, samples: int) -> None:
    """Refuse an iteration or a sample count the connection picture cannot use, before
    anything is drawn."""
    if samples < 1:
        raise ConfigError(f"the connection scores need at least one training image (samples >= 1), got {samples}")
    for run in runs:
        last = run.history.records[-1].iteration
        if iteration is not None and not 1 <= iteration <= last:
            choices = f"1-{last}" if last else "none yet"
            raise ConfigError(f"iteration {iteration} is not a pruning iteration of {run.path} ({choices})")


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
    folder = data_dir if data_dir is not None else run_data_dir(run.config.data_dir, run.path)
    inputs = pruning_inputs(run.config, samples, folder)
    dense, _ = load_weights(run.path / files.model_file(0))
    final, _ = load_weights(run.path / files.model_file(chosen))
    graph = analyse(dense.eval(), ModelInput((inputs[:1],)))
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
