"""One-shot comparison: every method from the same dense model at each sparsity, no retraining.

:func:`run_one_shot` prunes the experiment's dense trained model once per method, sparsity
and calibration draw and evaluates it on the test split (accuracy for a classifier, bits
per byte for a byte-level language model). The scored layers are the model's prunable
layers less those the experiment's ``ignore``/``only`` spare. Sparsity is the fraction of
their weights and biases removed (as ``nnrelief.prune``'s ``target`` counts it); every
method removes it:

* ``nnrelief`` - one NNrelief pass with ``target=1 - sparsity`` (one alpha for every layer);
* ``nnrelief-layer`` - one pass with ``target_scope="layer"`` (every layer to the sparsity,
  NNrelief's per-neuron alpha rule inside each layer's budget);
* every registry method that prunes to counts (:data:`~nnrelief.experiments.methods.METHODS`
  with ``equal="weights"``) at every layer's share of the sparsity (global magnitude at the total);
* ``nnrelief-2:4``, ``wanda-2:4``, ``row-magnitude-2:4`` - 2 of every 4 consecutive inputs per
  row (``nnrelief.prune(nm=(2, 4))``, Wanda's and magnitude's 2:4), at 50% alone; layers whose
  inputs do not split into groups of 4 (a 1- or 3-channel stem) stay dense for all three.

The calibration batches of draw d are ``prune_samples`` samples (sequences for a language
model) drawn with seed ``(seed, "one-shot", d)``; methods that read no batches run once
per sparsity (their spread is 0) unless BatchNorm statistics are recomputed on the
calibration batches (``recompute_bn``). ``test_samples`` evaluates on the first N test samples
(a language model: the first N windows of its context) where the whole split costs too much. Files, under ``<run folder>/one-shot`` (``one-shot-bn``
with BatchNorm recomputed), written atomically after every case, so a run continues where it
stopped: ``rows.json`` (every case), ``one-shot.md`` (mean and spread per method and sparsity)
and ``one-shot.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data as nndata
from ..fileio import cpu_state
from ..models import input_shape
from ..pruning.choices import spared_layers
from ..pruning.masks import current_mask
from ..pruning.nm import nm_misfits
from ..pruning.prune import prune
from ..training.batchnorm import recompute_batchnorm
from ..training.loops import evaluate
from .baselines import prunable_layers
from .config import ConfigError, derive_seed
from .experiment import Experiment
from .methods import METHODS, Targets
from .rowwise import row_magnitude_prune, wanda_prune
from .runfolder import RunFolder

__all__ = ["ONE_SHOT_METHODS", "OneShot", "run_one_shot"]

logger = logging.getLogger(__name__)

Runner = Callable[[nn.Module, float, Iterable[Any], Experiment], object]


def _nnrelief(scope: str) -> Runner:
    def run(model: nn.Module, sparsity: float, batches: Iterable[Any], experiment: Experiment) -> object:
        cfg = experiment.cfg
        return prune(model, batches, target=1.0 - sparsity, target_scope=scope, score=cfg.score, ignore=cfg.ignore,
                     only=cfg.only, progress=False)  # fmt: skip

    return run


def _registry(name: str) -> Runner:
    def run(model: nn.Module, sparsity: float, batches: Iterable[Any], experiment: Experiment) -> object:
        totals = scored_totals(model, experiment)
        targets = Targets.uniform(totals, 1.0 - sparsity, experiment.cfg.seed, input_shape(experiment.cfg.model))
        return METHODS[name].prune(model, targets, 1, batches)

    return run


NM = (2, 4)


def _nm_layers(model: nn.Module, experiment: Experiment) -> list[str]:
    """The scored layers whose inputs split into groups of m (the others stay dense under n:m)."""
    layers = prunable_layers(model)
    totals = scored_totals(model, experiment)
    misfits = nm_misfits({name: layers[name] for name in totals}, NM[1])
    if misfits:
        logger.info("%d:%d leaves %s dense (inputs not in groups of %d)", *NM, ", ".join(misfits), NM[1])
    return [name for name in totals if name not in misfits]


def _nnrelief_nm(model: nn.Module, _sparsity: float, batches: Iterable[Any], experiment: Experiment) -> object:
    cfg, kept = experiment.cfg, set(_nm_layers(model, experiment))
    dense = [name for name in prunable_layers(model) if name not in kept]
    return prune(model, batches, nm=NM, score=cfg.score, ignore=[*cfg.ignore, *dense], only=cfg.only, progress=False)


def _wanda_nm(model: nn.Module, _sparsity: float, batches: Iterable[Any], experiment: Experiment) -> object:
    return wanda_prune(model, batches, dict.fromkeys(_nm_layers(model, experiment), 0), nm=NM)


def _magnitude_nm(model: nn.Module, _sparsity: float, _batches: Iterable[Any], experiment: Experiment) -> object:
    return row_magnitude_prune(model, dict.fromkeys(_nm_layers(model, experiment), 0), nm=NM)


@dataclass(frozen=True)
class OneShotMethod:
    """A method of the one-shot comparison: how it prunes, whether it reads the calibration
    batches, and the one sparsity it prunes to (n:m), if so."""

    run: Runner
    data: bool
    sparsity: float | None = None


ONE_SHOT_METHODS: dict[str, OneShotMethod] = {
    "nnrelief": OneShotMethod(_nnrelief("model"), True),
    "nnrelief-layer": OneShotMethod(_nnrelief("layer"), True),
    **{name: OneShotMethod(_registry(name), method.data or name == "random")
       for name, method in METHODS.items() if method.prune is not None and method.equal == "weights"},
    "nnrelief-2:4": OneShotMethod(_nnrelief_nm, True, 1 - NM[0] / NM[1]),
    "wanda-2:4": OneShotMethod(_wanda_nm, True, 1 - NM[0] / NM[1]),
    "row-magnitude-2:4": OneShotMethod(_magnitude_nm, False, 1 - NM[0] / NM[1]),
}  # fmt: skip
"""Every method of the one-shot comparison by name."""
DEFAULT_ONE_SHOT = ("nnrelief", "nnrelief-layer", "magnitude", "global-magnitude", "row-magnitude", "wanda", "wanda-mean",
                    "nnrelief-2:4", "wanda-2:4", "row-magnitude-2:4")  # fmt: skip


def scored_totals(model: nn.Module, experiment: Experiment) -> dict[str, int]:
    """All weights + biases per scored layer: the prunable ones the experiment does not spare."""
    layers = prunable_layers(model)
    spared = spared_layers(layers, list(experiment.cfg.ignore), list(experiment.cfg.only))
    return {name: m.weight.numel() + (0 if m.bias is None else m.bias.numel()) for name, m in layers.items() if name not in spared}


def remaining_fraction(model: nn.Module, totals: dict[str, int]) -> float:
    """Kept / all weights and biases of the layers of ``totals``."""
    layers = prunable_layers(model)
    kept = 0
    for name in totals:
        module = layers[name]
        kept += int(current_mask(module, "weight").sum()) + (0 if module.bias is None else int(current_mask(module, "bias").sum()))
    return kept / sum(totals.values())


def calibration_batches(experiment: Experiment, draw: int) -> list[Any]:
    """Draw ``draw``'s calibration batches: ``prune_samples`` training samples (sequences of
    a language model's context), from seed ``(seed, "one-shot", draw)``, as a list."""
    cfg, seed = experiment.cfg, derive_seed(experiment.cfg.seed, "one-shot", draw)
    if isinstance(experiment.train_set, nndata.TokenStream):
        size = min(cfg.batch_size, cfg.prune_samples)
        loader = nndata.SequenceLoader(experiment.train_set, size, experiment.context, shuffle=True, seed=seed,
                                       device=experiment.device, steps=-(-cfg.prune_samples // size))  # fmt: skip
        return list(loader)
    picked = nndata.sample_pruning_set(experiment.train_set, cfg.prune_samples, seed=seed)
    return list(nndata.BatchLoader(picked, 500, shuffle=False, seed=0, device=experiment.device))


@dataclass
class OneShot:
    """The cases of one one-shot comparison (rows of ``rows.json``) and where they live."""

    folder: Path
    metric: str
    rows: list[dict[str, Any]]
    title: str
    test_samples: int | None = None

    def summary(self) -> dict[str, dict[float, tuple[float, float, float, int]]]:
        """Per method and sparsity: (mean metric, its standard deviation over draws, mean
        remaining fraction, number of draws)."""
        groups: dict[str, dict[float, list[dict[str, Any]]]] = {}
        order = ["dense", *ONE_SHOT_METHODS]
        for row in sorted(self.rows, key=lambda row: order.index(row["method"]) if row["method"] in order else len(order)):
            groups.setdefault(row["method"], {}).setdefault(row["sparsity"], []).append(row)
        return {
            method: {sparsity: (statistics.fmean(r["metric"] for r in rows),
                                statistics.stdev([r["metric"] for r in rows]) if len(rows) > 1 else 0.0,
                                statistics.fmean(r["remaining"] for r in rows), len(rows))
                     for sparsity, rows in sorted(by.items())}
            for method, by in groups.items()
        }  # fmt: skip

    def markdown(self) -> str:
        """The metric (mean ± standard deviation over calibration draws) per method and sparsity,
        then the remaining fraction each reached."""
        summary = self.summary()
        sparsities = sorted({s for by in summary.values() for s in by if s > 0})
        dense = summary.get("dense", {}).get(0.0)
        lines = [f"# One shot: {self.title}", "", f"Test {self.metric}, no retraining"
                 + (f" (dense: {dense[0]:.4g})" if dense else "") + "; mean ± standard deviation over calibration draws (n):", ""]  # fmt: skip
        lines += ["| method | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |", "|---|" + "---:|" * len(sparsities)]
        for method, by in summary.items():
            if method != "dense":
                lines.append(f"| {method} | " + " | ".join(_cell(by.get(s)) for s in sparsities) + " |")
        lines += ["", "Remaining weights and biases of the scored layers (%), what each method reached at the sparsity asked "
                  "(an NNrelief pass removes every connection of zero contribution and every dead neuron whatever "
                  "the target, so it may remove more):", ""]  # fmt: skip
        lines += ["| method | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |", "|---|" + "---:|" * len(sparsities)]
        for method, by in summary.items():
            if method != "dense":
                lines.append(f"| {method} | " + " | ".join(f"{100 * by[s][2]:.2f}" if s in by else "-" for s in sparsities) + " |")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        """Write ``rows.json``, ``one-shot.csv`` and ``one-shot.md``."""
        out = RunFolder(self.folder)
        out.write_json("rows.json", {"metric": self.metric, "title": self.title, "test_samples": self.test_samples, "rows": self.rows})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["method", "sparsity", "draw", "remaining", "metric"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        out.write_text("one-shot.csv", text.getvalue())
        out.write_text("one-shot.md", self.markdown())


def _cell(entry: tuple[float, float, float, int] | None) -> str:
    if entry is None:
        return "-"
    mean, spread, _, count = entry
    return f"{mean:.4g} ± {spread:.2g} ({count})" if count > 1 else f"{mean:.4g}"


def check_one_shot(methods: Sequence[str], sparsities: Sequence[float], draws: int, test_samples: int | None = None) -> None:
    """Refuse unknown methods, sparsities outside (0, 1), fewer than one draw or test sample, before anything runs."""
    if test_samples is not None and test_samples < 1:
        raise ConfigError(f"test_samples must be at least 1 (or none: the whole test split), got {test_samples}")
    unknown = [name for name in methods if name not in ONE_SHOT_METHODS]
    if unknown:
        raise ConfigError(f"unknown one-shot method {', '.join(unknown)}; known: {', '.join(ONE_SHOT_METHODS)}")
    bad = [s for s in sparsities if not 0.0 < s < 1.0]
    if bad or not sparsities:
        raise ConfigError(f"sparsities are fractions of the scored weights to remove, in (0, 1); got {list(sparsities)}")
    if draws < 1:
        raise ConfigError(f"draws must be at least 1, got {draws}")


def run_one_shot(
    experiment: Experiment,
    methods: Sequence[str] = DEFAULT_ONE_SHOT,
    sparsities: Sequence[float] = (0.5, 0.6, 0.7, 0.8),
    *,
    draws: int = 3,
    recompute_bn: bool = False,
    test_samples: int | None = None,
    progress: bool = True,
) -> OneShot:
    """Prune the dense model with every method at every sparsity (and calibration draw) and
    evaluate it; cases already in ``rows.json`` are kept (see the module docstring)."""
    check_one_shot(methods, sparsities, draws, test_samples)
    cfg = experiment.cfg
    dense_state = cpu_state(experiment.train_dense())
    metric = "bits per byte" if cfg.is_language_model else "accuracy (%)"
    folder = experiment.run_dir / ("one-shot-bn" if recompute_bn else "one-shot")
    title = f"{cfg.model} on {cfg.dataset}, seed {cfg.seed}, {cfg.prune_samples} calibration samples" + (
        ", BatchNorm statistics recomputed on them" if recompute_bn else "")  # fmt: skip
    if test_samples is not None:
        title += f"; the first {test_samples} test {'windows' if cfg.is_language_model else 'samples'}"
    result = OneShot(folder, metric, _done_rows(folder, test_samples), title, test_samples)
    test_batches = _test_batches(experiment, test_samples)
    done = {(r["method"], r["sparsity"], r["draw"]) for r in result.rows}
    cases = [("dense", 0.0, 0)]
    for name in methods:
        method = ONE_SHOT_METHODS[name]
        for sparsity in sparsities if method.sparsity is None else [method.sparsity]:
            cases += [(name, sparsity, d) for d in (range(draws) if method.data or recompute_bn else [0])]
    cases.sort(key=lambda case: case[1])  # every method at one sparsity before the next
    todo = [case for case in cases if case not in done]
    batches: dict[int, list[Any]] = {}
    for method, sparsity, draw in tqdm(todo, desc="one-shot", unit="case", disable=None if progress else True):
        model = experiment.initial_model()
        model.load_state_dict(dense_state)
        if method != "dense":
            calibration = batches.setdefault(draw, calibration_batches(experiment, draw))
            ONE_SHOT_METHODS[method].run(model, sparsity, calibration, experiment)
            if recompute_bn:
                recompute_batchnorm(model, calibration)
        result.rows.append(_evaluated(experiment, model, test_batches, method, sparsity, draw))
        result.write()
        logger.info("one shot %s at %g (draw %d): %s %.4f", method, sparsity, draw, metric, result.rows[-1]["metric"])
    result.write()
    return result


def _test_batches(experiment: Experiment, samples: int | None) -> Iterable[Any]:
    """The test batches: all of them, or those of the first ``samples`` samples (windows)."""
    if samples is None:
        return experiment.test_batches
    test = experiment.test_set
    if isinstance(test, nndata.TokenStream):
        tokens = test.tokens[: samples * experiment.context + 1]
        return nndata.SequenceLoader(dataclasses.replace(test, tokens=tokens), 64, experiment.context, shuffle=False,
                                     seed=0, device=experiment.device)  # fmt: skip
    picked = nndata.subset(test, torch.arange(min(samples, len(test))))
    return nndata.BatchLoader(picked, 500, shuffle=False, seed=0, device=experiment.device)


def _evaluated(experiment: Experiment, model: nn.Module, batches: Iterable[Any], method: str, sparsity: float,
               draw: int) -> dict[str, Any]:  # fmt: skip
    scores = evaluate(model, batches, experiment.device)
    value = scores.bits_per_token if experiment.cfg.is_language_model else 100 * scores.accuracy
    totals = scored_totals(model, experiment)
    return {"method": method, "sparsity": sparsity, "draw": draw, "remaining": remaining_fraction(model, totals), "metric": value}


def _done_rows(folder: Path, test_samples: int | None) -> list[dict[str, Any]]:
    """The cases already evaluated in ``folder``; refused if they were evaluated on another test set."""
    if not (folder / "rows.json").exists():
        return []
    done = RunFolder(folder).read_json("rows.json")
    if done.get("test_samples") != test_samples:
        raise ConfigError(f"{folder} holds cases evaluated on test_samples={done.get('test_samples')}, not {test_samples}: "
                          "give the same --test-samples, or move the folder away to start again")  # fmt: skip
    return list(done["rows"])
