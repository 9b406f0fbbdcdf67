"""The iterative NNrelief procedure: prune -> retrain loops, history, run folders, resume.

Two layers:

* :func:`relieve` is the library loop for any model and any training function: ``num_iters``
  times it runs one pruning pass (:func:`nnrelief.prune`), measures the accuracies before
  retraining, optionally rewinds the surviving weights to their initial values
  (:func:`rewind`), calls the user's ``train_fn`` and measures again. Every iteration becomes
  an :class:`IterationRecord` of a :class:`History`. With ``run_dir`` it stores its state
  after every step (pruned, retrained) and resumes from it.
* :class:`ExperimentConfig` + :class:`Experiment` are the paper's experiments end to end
  (data, dense training, the loop, files) as used by the ``nnrelief`` command; presets in
  :data:`PRESETS`.

Files of a run folder (all written atomically: temporary file + ``os.replace``):

==========================  ==============================================================
``config.json``             the :class:`ExperimentConfig` (runs never mix configs)
``init.pt``                 initial weights (plain ``state_dict``)
``dense.ckpt``              per-epoch checkpoint of the dense training (removed when done)
``trained.pt``              the dense trained weights
``retrain-<k>.ckpt``        per-epoch checkpoint of retraining in iteration k (removed)
``relief_state.pt``         the loop's state: model with masks, history, pending record
``model-iter<k>.pt``        weights and masks after iteration k (load with ``restore_masks``)
``history.csv/.json``       one row per iteration (iteration 0 = the dense model)
==========================  ==============================================================
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import data as nndata
from .masks import GATE, refresh_masked, restore_masks
from .metrics import summarize
from .models import MODELS, get_model
from .models import input_shape as model_input_shape
from .pruning import SCORE_MODES, prune
from .training import TrainConfig, evaluate, fit, resolve_device

__all__ = [
    "PRESETS",
    "ConfigError",
    "Experiment",
    "ExperimentConfig",
    "History",
    "IterationRecord",
    "RunConflictError",
    "derive_seed",
    "load_config_file",
    "load_weights",
    "relieve",
    "resolve_config",
    "rewind",
    "run_name",
]

logger = logging.getLogger(__name__)

STATE_FILE = "relief_state.pt"
CONFIG_FILE = "config.json"
_STATE_FORMAT = 1


class ConfigError(ValueError):
    """An invalid experiment setting, preset, config file or run folder."""


class RunConflictError(ConfigError):
    """A run folder already holds a run with different settings."""


# ----------------------------------------------------------------------------- helpers


def derive_seed(*parts: object) -> int:
    """A 63-bit seed depending only on ``parts`` (e.g. the run seed, a purpose, an iteration)."""
    digest = hashlib.blake2b(repr(("nnrelief.iterative",) + parts).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_torch(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def _save_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------- history


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
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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
        """Inverse of :meth:`to_dict`."""
        return cls(
            records=[IterationRecord.from_dict(r) for r in data["iterations"]],
            stopped_early=bool(data["stopped_early"]),
            selected_iteration=int(data["selected_iteration"]),
        )

    def to_csv(self) -> str:
        """The history as CSV text, one row per iteration."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        for record in self.records:
            writer.writerow(record.flat())
        return out.getvalue()

    def write(self, run_dir: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> None:
        """Write ``history.csv`` and ``history.json`` (plus ``extra`` keys) atomically."""
        run_dir = Path(run_dir)
        _save_text(self.to_csv(), run_dir / "history.csv")
        payload = {**(extra or {}), **self.to_dict()}
        _save_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", run_dir / "history.json")

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


# ----------------------------------------------------------------------------- relieve


def rewind(model: nn.Module, init_state: Mapping[str, Tensor]) -> None:
    """Reset the surviving weights of ``model`` to their initial values, keeping the masks.

    Every masked tensor gets ``<name>_orig = init[<name>] * <name>_mask``; every other
    parameter and buffer found in ``init_state`` (e.g. unmasked layers, BatchNorm running
    statistics) is copied back as is. Masks and shortcut gates are left untouched.
    ``init_state`` is the ``state_dict`` of the model before training (with or without
    masks).
    """
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key.endswith("_orig"):
                base = key[: -len("_orig")]
                init = init_state.get(base, init_state.get(key))
                if init is None:
                    raise KeyError(f"rewind: initial state has no entry for {base!r}")
                mask = state[f"{base}_mask"]
                value.copy_(init.to(value.device, value.dtype) * mask)
            elif key.endswith("_mask") or key.rpartition(".")[2] == GATE:
                continue
            elif key in init_state:
                value.copy_(init_state[key].to(value.device, value.dtype))
    refresh_masked(model)


def _load_earlier(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a state saved before the latest pruning pass into the (now more masked) model:
    masks the earlier state lacks are all ones."""
    loaded = {}
    for key, value in model.state_dict().items():
        if key in state:
            loaded[key] = state[key]
        elif key.endswith("_orig") and key[: -len("_orig")] in state:
            loaded[key] = state[key[: -len("_orig")]]
        elif key.endswith("_mask") or key.rpartition(".")[2] == GATE:
            loaded[key] = torch.ones_like(value)
        else:
            raise KeyError(f"earlier state has no entry for {key!r}")
    model.load_state_dict(loaded)
    refresh_masked(model)


def _measure(model: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    summary = summarize(model, shape)
    return {
        "params_remaining": summary.params_nonzero,
        "params_total": summary.params_total,
        "alive": summary.architecture(),
        "channels_total": {layer.name: layer.channels_total for layer in summary.layers},
        "macs_dense": summary.macs_dense,
        "macs_sparse": summary.macs_sparse,
    }


def _input_shape(batches: Iterable[Any]) -> tuple[int, ...]:
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return tuple(x.shape[1:])
    raise ValueError("no pruning batches: pass a non-empty iterable of inputs")


def _check_state(state: Mapping[str, Any], settings: Mapping[str, Any], path: Path) -> None:
    if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"{path} is not a nnrelief loop state (format {_STATE_FORMAT})")
    diff = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if diff:
        details = ", ".join(f"{k}: stored={a!r} now={b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{path} was written with other settings ({details}); use another run_dir")


def relieve(
    model: nn.Module,
    *,
    prune_batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    train_fn: Callable[[nn.Module, int], object],
    eval_fns: Mapping[str, Callable[[nn.Module], float]],
    num_iters: int,
    alpha_fc: float = 0.95,
    alpha_conv: float = 0.9,
    score: str = "paper",
    rewind_state: Mapping[str, Tensor] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    early_stop_margin: float | None = None,
    early_stop_metric: str = "val",
    input_shape: tuple[int, ...] | None = None,
    progress: bool = True,
    on_iteration_end: Callable[[IterationRecord], None] | None = None,
    history_extra: Mapping[str, Any] | None = None,
) -> History:
    """Iterative NNrelief on a trained ``model``, in place: prune, retrain, repeat.

    Iteration 0 records the model as given. Then ``num_iters`` times: one pruning pass on
    the pruning set, evaluation ("before"), rewinding to ``rewind_state`` if given,
    ``train_fn(model, iteration)``, evaluation ("after"). The masks hold during training
    (PyTorch pruning reparametrisation), so ``train_fn`` may be any ordinary loop over
    ``model.parameters()``, e.g. :func:`nnrelief.training.fit`.

    Args:
        model: the trained dense (or already pruned) model.
        prune_batches: pruning set batches (inputs or ``(input, target)`` pairs), or a
            function of the 1-based iteration returning them (to draw a new set per
            iteration reproducibly).
        train_fn: retrains the model in place; called with the iteration number.
        eval_fns: named accuracy functions (fraction in [0, 1]), e.g. ``{"val": ...,
            "test": ...}``.
        num_iters: number of pruning iterations.
        alpha_fc: kept signal fraction of Linear layers.
        alpha_conv: kept signal fraction of Conv2d layers.
        score: ``"paper"`` or ``"authors"`` (see :func:`nnrelief.prune`).
        rewind_state: initial ``state_dict``; when given, surviving weights are reset to
            it before each retraining (:func:`rewind`), as the paper does for LeNets.
        run_dir: folder for the loop state, per-iteration weights and history files.
            If it holds a state from an interrupted call with the same settings, the loop
            continues from there (``num_iters`` may be raised to extend a finished run).
            ``train_fn`` should then resume its own work too (``fit(checkpoint_path=...)``).
        early_stop_margin: stop when ``eval_fns[early_stop_metric]`` after retraining falls
            more than this (a fraction, 0.01 = 1 point) below the iteration-0 value; the
            model is then set back to the previous iteration's weights.
        early_stop_metric: the evaluation used by the early stop.
        input_shape: shape of one input (no batch dimension) for counting MACs; default:
            that of the first pruning batch.
        progress: tqdm bars.
        on_iteration_end: called with each finished record after its state is stored.
        history_extra: extra keys written into ``history.json`` (e.g. the configuration).

    Returns:
        The :class:`History`; ``model`` holds the weights of ``history.selected_iteration``.
    """
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    if not eval_fns:
        raise ValueError("eval_fns must name at least one evaluation, e.g. {'val': ...}")
    if score not in SCORE_MODES:
        raise ValueError(f"score must be one of {SCORE_MODES}, got {score!r}")
    if early_stop_margin is not None:
        if early_stop_margin < 0:
            raise ValueError(f"early_stop_margin must be >= 0, got {early_stop_margin}")
        if early_stop_metric not in eval_fns:
            raise ValueError(f"early_stop_metric {early_stop_metric!r} is not one of {sorted(eval_fns)}")

    def batches_for(iteration: int) -> Iterable[Any]:
        return prune_batches(iteration) if callable(prune_batches) else prune_batches

    shape = tuple(input_shape) if input_shape is not None else _input_shape(batches_for(1))
    settings = {
        "alpha_fc": alpha_fc,
        "alpha_conv": alpha_conv,
        "score": score,
        "rewind": rewind_state is not None,
        "early_stop_margin": early_stop_margin,
        "early_stop_metric": early_stop_metric,
        "eval": sorted(eval_fns),
    }
    folder = Path(run_dir) if run_dir is not None else None
    state_path = folder / STATE_FILE if folder is not None else None

    def evaluate_all() -> dict[str, float]:
        return {name: float(fn(model)) for name, fn in eval_fns.items()}

    def save(phase: str, history: History, pending: IterationRecord | None, previous: dict[str, Tensor] | None) -> None:
        """Store the loop state (the commit point of each step) after the files it names."""
        if folder is None:
            return
        if phase == "retrained":
            _save_torch(_cpu_state(model), folder / f"model-iter{history.records[-1].iteration}.pt")
        if phase != "pruned":
            history.write(folder, history_extra)
        _save_torch(
            {
                "format": _STATE_FORMAT,
                "settings": settings,
                "phase": phase,
                "model": _cpu_state(model),
                "previous": previous,
                "history": history.to_dict(),
                "pending": pending.to_dict() if pending is not None else None,
            },
            state_path,
        )

    pending: IterationRecord | None = None
    previous: dict[str, Tensor] | None = None
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_state(state, settings, state_path)
        restore_masks(model, state["model"])
        history = History.from_dict(state["history"])
        phase = state["phase"]
        previous = state["previous"]
        pending = IterationRecord.from_dict(state["pending"]) if state["pending"] else None
        logger.info(
            "resuming %s: %d iteration(s) done%s", folder, history.records[-1].iteration,
            f", iteration {pending.iteration} pruned but not retrained" if pending else "",
        )  # fmt: skip
    else:
        start = time.perf_counter()
        accuracy = evaluate_all()
        record = IterationRecord(0, dict(accuracy), dict(accuracy), **_measure(model, shape))
        record.seconds = time.perf_counter() - start
        history = History([record])
        phase = "retrained"
        save(phase, history, None, None)
        logger.info("iteration 0 (dense): %s", _describe(record))

    reference = history.records[0].accuracy_after
    done = history.records[-1].iteration
    bar = tqdm(total=num_iters, initial=min(done, num_iters), desc="nnrelief iterations",
               unit="iter", disable=None if progress else True)  # fmt: skip
    try:
        while not history.stopped_early and (phase == "pruned" or done < num_iters):
            if phase != "pruned":
                iteration = done + 1
                start = time.perf_counter()
                previous = _cpu_state(model) if early_stop_margin is not None else None
                # prune() shows its bar whenever asked, even when stderr is not a terminal
                report = prune(model, batches_for(iteration), alpha_fc=alpha_fc, alpha_conv=alpha_conv,
                               score=score, progress=progress and sys.stderr.isatty())  # fmt: skip
                prune_seconds = time.perf_counter() - start
                accuracy = evaluate_all()
                pending = IterationRecord(
                    iteration, accuracy, {}, **_measure(model, shape),
                    prune_seconds=prune_seconds, report=report.to_dict(),
                )  # fmt: skip
                pending.seconds = time.perf_counter() - start
                phase = "pruned"
                save(phase, history, pending, previous)
                logger.info("iteration %d pruned: %s", iteration, _describe(pending, before=True))
            assert pending is not None
            start = time.perf_counter()
            if rewind_state is not None:
                rewind(model, rewind_state)
            train_fn(model, pending.iteration)
            refresh_masked(model)
            pending.retrain_seconds = time.perf_counter() - start
            pending.accuracy_after = evaluate_all()
            pending.seconds += time.perf_counter() - start
            history.records.append(pending)
            done = pending.iteration
            history.selected_iteration = done
            logger.info("iteration %d retrained: %s", done, _describe(pending))
            finished, pending = history.records[-1], None
            if early_stop_margin is not None and (
                finished.accuracy_after[early_stop_metric]
                < reference[early_stop_metric] - early_stop_margin
            ):
                if folder is not None:
                    _save_torch(_cpu_state(model), folder / f"model-iter{done}.pt")
                assert previous is not None
                _load_earlier(model, previous)
                history.stopped_early = True
                history.selected_iteration = done - 1
                phase = "stopped"
                logger.info(
                    "early stop: %s accuracy %.4f is more than %.4f below the dense %.4f; "
                    "keeping iteration %d", early_stop_metric,
                    finished.accuracy_after[early_stop_metric], early_stop_margin,
                    reference[early_stop_metric], done - 1,
                )  # fmt: skip
            else:
                phase = "retrained"
            save(phase, history, None, None)
            previous = None
            bar.update(1)
            if on_iteration_end is not None:
                on_iteration_end(finished)
    finally:
        bar.close()
    return history


def _describe(record: IterationRecord, before: bool = False) -> str:
    accuracy = record.accuracy_before if before else record.accuracy_after
    parts = [f"{name} acc {value:.4f}" for name, value in accuracy.items()]
    parts.append(f"{record.params_remaining}/{record.params_total} params ({record.remaining_percent:.2f}%)")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- experiments

# Settings that may change between invocations on the same run folder: where the data
# are, where to compute, and how many iterations to run (to extend a finished run).
FREE_FIELDS = frozenset({"data_dir", "device", "num_iters"})
_EVAL_BATCH = 500


@dataclass
class ExperimentConfig:
    """All settings of one paper-style experiment (dense training + iterative pruning).

    Attributes:
        model: a name of :data:`nnrelief.models.MODELS`.
        dataset: a name of :data:`nnrelief.data.DATASETS` (it fixes the number of classes).
        data_dir: folder of the dataset files (not needed for ``mnist-sample``).
        epochs: dense training epochs.
        retrain_epochs: training epochs after each pruning pass.
        optimizer: ``adam``, ``sgd`` or ``adamw``.
        lr: learning rate of the dense training.
        retrain_lr: learning rate of retraining (``None``: ``lr``).
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        batch_size: training batch size.
        milestones: dense-training epochs after which the learning rate decays.
        retrain_milestones: the same for retraining.
        gamma: learning-rate decay factor.
        alpha_fc: kept signal fraction of Linear layers.
        alpha_conv: kept signal fraction of Conv2d layers.
        score: ``paper`` or ``authors`` conv score.
        num_iters: pruning iterations.
        prune_samples: size of the pruning set, drawn from the training data anew each
            iteration (seeded by ``seed`` and the iteration).
        val_size: validation samples held out of the training data (``None``: the
            dataset's default); the best epoch is chosen on them, never on the test set.
        augment: crop + flip augmentation of training batches (``None``: dataset default).
        rewind: reset surviving weights to their initial values before retraining
            (the paper's procedure for LeNets) instead of fine-tuning.
        seed: seed of everything (model init, splits, batches, pruning sets).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        early_stop_margin: stop when validation accuracy falls more than this fraction
            below the dense model's (``None``: run all iterations).
        train_subset: train on this many samples of the training split only (quick runs).
    """

    model: str = "lenet300_100"
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 60
    retrain_epochs: int = 60
    optimizer: str = "adam"
    lr: float = 1e-3
    retrain_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 120
    milestones: list[int] = field(default_factory=lambda: [30])
    retrain_milestones: list[int] = field(default_factory=lambda: [30])
    gamma: float = 0.1
    alpha_fc: float = 0.95
    alpha_conv: float = 0.9
    score: str = "paper"
    num_iters: int = 10
    prune_samples: int = 1000
    val_size: int | None = None
    augment: bool | None = None
    rewind: bool = False
    seed: int = 0
    device: str = "auto"
    early_stop_margin: float | None = None
    train_subset: int | None = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(getattr(self, f.name), hints[f.name], f.name))
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; known: {', '.join(sorted(MODELS))}")
        if self.dataset not in nndata.DATASETS:
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; known: {', '.join(sorted(nndata.DATASETS))}"
            )
        spec = nndata.get_spec(self.dataset)
        if model_input_shape(self.model) != spec.image_shape:
            raise ConfigError(
                f"model {self.model} expects inputs {model_input_shape(self.model)}, dataset "
                f"{self.dataset} has images {spec.image_shape}"
            )
        if self.score not in SCORE_MODES:
            raise ConfigError(f"score must be one of {SCORE_MODES}, got {self.score!r}")
        for name in ("alpha_fc", "alpha_conv"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("num_iters",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "prune_samples", "val_size", "train_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.early_stop_margin is not None and self.early_stop_margin < 0:
            raise ConfigError(f"early_stop_margin must be >= 0, got {self.early_stop_margin}")
        try:
            self.train_config()
            self.train_config(retrain_iteration=1)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def num_classes(self) -> int:
        """Number of classes of :attr:`dataset`."""
        return nndata.get_spec(self.dataset).num_classes

    def train_config(self, retrain_iteration: int | None = None) -> TrainConfig:
        """The :class:`TrainConfig` of the dense training, or of retraining in an iteration."""
        if retrain_iteration is None:
            epochs, lr, milestones = self.epochs, self.lr, self.milestones
            seed = derive_seed(self.seed, "dense")
        else:
            epochs, milestones = self.retrain_epochs, self.retrain_milestones
            lr = self.retrain_lr if self.retrain_lr is not None else self.lr
            seed = derive_seed(self.seed, "retrain", retrain_iteration)
        return TrainConfig(
            optimizer=self.optimizer, lr=lr, momentum=self.momentum,
            weight_decay=self.weight_decay, epochs=epochs, milestones=list(milestones),
            gamma=self.gamma, device=self.device, seed=seed,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a dict (e.g. a TOML file); unknown keys raise :class:`ConfigError`."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; valid: {', '.join(known)}")
        return cls(**dict(data))

    def config_hash(self) -> str:
        """8 hex digits identifying the settings (all but :data:`FREE_FIELDS`)."""
        fixed = {k: v for k, v in self.to_dict().items() if k not in FREE_FIELDS}
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:8]


def _convert(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a field's type hint (ints are accepted for floats)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_convert(v, args[0], name) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be of type {hint.__name__}, got {value!r}")
    return value


_LENET = {
    "optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-4, "batch_size": 120, "epochs": 60,
    "retrain_epochs": 60, "milestones": [30], "retrain_milestones": [30], "rewind": True,
}  # fmt: skip
_CIFAR_ADAM = {
    "optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-4, "batch_size": 120, "epochs": 150,
    "milestones": [80, 120], "retrain_epochs": 60, "retrain_milestones": [20, 40],
    "alpha_conv": 0.95, "alpha_fc": 0.95, "num_iters": 6, "rewind": False,
}  # fmt: skip
_RESNET_CIFAR10 = {
    "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 120, "epochs": 150,
    "milestones": [80, 120], "retrain_epochs": 60, "retrain_milestones": [20, 40],
    "alpha_conv": 0.95, "alpha_fc": 0.99, "num_iters": 10, "rewind": False,
}  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "model": "lenet300_100", "dataset": "mnist-sample", "optimizer": "adam", "lr": 1e-3,
        "weight_decay": 5e-4, "batch_size": 120, "epochs": 8, "retrain_epochs": 4, "milestones": [],
        "retrain_milestones": [], "alpha_fc": 0.95, "num_iters": 5, "rewind": True,
    },
    "lenet300-mnist": dict(model="lenet300_100", dataset="mnist", alpha_fc=0.95, num_iters=20, **_LENET),
    "lenet5-mnist": dict(model="lenet5", dataset="mnist", alpha_conv=0.9, alpha_fc=0.95, num_iters=10, **_LENET),
    "vgglike-cifar10": dict(model="vgg_like", dataset="cifar10", **_CIFAR_ADAM),
    "vgg16-cifar10": dict(model="vgg16", dataset="cifar10", **_CIFAR_ADAM),
    "resnet20-cifar10": dict(model="resnet20", dataset="cifar10", **_RESNET_CIFAR10),
    "resnet32-cifar10": dict(model="resnet32", dataset="cifar10", **_RESNET_CIFAR10),
    "resnet56-cifar100": {
        "model": "resnet56", "dataset": "cifar100", "optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-4,
        "batch_size": 120, "epochs": 200, "milestones": [120, 160], "retrain_epochs": 80,
        "retrain_milestones": [30, 60], "alpha_conv": 0.95, "alpha_fc": 0.99, "num_iters": 10,
        "prune_samples": 2000, "rewind": False,
    },
}  # fmt: skip
"""Named settings of the paper's experiments (ALGORITHM.md) and a quick offline demo.

Batch size 120 and weight decay 5e-4 are the defaults of the authors' training script
where their table gives none; LeNets decay the learning rate after epoch 30 likewise."""


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML experiment file: top-level keys are :class:`ExperimentConfig` fields,
    plus an optional ``preset``. Needs Python >= 3.11 (``tomllib``) or ``tomli``."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(
                "reading TOML config files needs Python >= 3.11 or the 'tomli' package "
                "(pip install tomli)"
            ) from None
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None


def resolve_config(
    preset: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[ExperimentConfig, str]:
    """Merge defaults < preset < config file < ``overrides`` into a config.

    Returns the config and a label for its run folder (the preset's name, else
    ``<model>-<dataset>``). A ``preset`` argument wins over a ``preset`` key in the file.
    """
    values: dict[str, Any] = {}
    from_file = load_config_file(config_file) if config_file is not None else {}
    file_preset = from_file.pop("preset", None)
    preset = preset if preset is not None else file_preset
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(from_file)
    values.update(overrides or {})
    cfg = ExperimentConfig.from_dict(values)
    return cfg, preset if preset is not None else f"{cfg.model}-{cfg.dataset}"


def run_name(cfg: ExperimentConfig, label: str) -> str:
    """Folder name of a run: ``<label>-<config hash>``."""
    return f"{label}-{cfg.config_hash()}"


def _prepare_run_dir(cfg: ExperimentConfig, run_dir: Path) -> None:
    path = run_dir / CONFIG_FILE
    current = cfg.to_dict()
    if path.exists():
        stored = json.loads(path.read_text())
        diff = [k for k in current if k not in FREE_FIELDS and stored.get(k) != current[k]]
        if diff:
            details = ", ".join(f"{k}: stored={stored.get(k)!r} now={current[k]!r}" for k in diff)
            raise RunConflictError(
                f"run folder {run_dir} holds a run with other settings ({details}); "
                "choose another --run-dir or delete it"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunConflictError(f"{run_dir} is not empty and holds no {CONFIG_FILE}: not a run folder")
    _save_text(json.dumps(current, indent=2) + "\n", path)


def load_weights(
    path: str | os.PathLike[str], model: str | None = None, dataset: str | None = None
) -> tuple[nn.Module, ExperimentConfig | None]:
    """Load a saved ``state_dict`` (with or without masks) into a fresh model.

    ``model`` defaults to the one in the ``config.json`` next to the file (a run folder);
    the number of classes comes from ``dataset`` (default: that config's). Returns the
    model (on CPU, eval mode) and the run's config if there is one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    config_path = path.parent / CONFIG_FILE
    cfg = ExperimentConfig.from_dict(json.loads(config_path.read_text())) if config_path.exists() else None
    model_name = model or (cfg.model if cfg else None)
    dataset_name = dataset or (cfg.dataset if cfg else None)
    if model_name is None or dataset_name is None:
        raise ConfigError(f"{path} is not in a run folder: give the model and the dataset")
    if dataset_name not in nndata.DATASETS:
        raise ConfigError(f"unknown dataset {dataset_name!r}; known: {', '.join(sorted(nndata.DATASETS))}")
    try:
        net = get_model(model_name, nndata.get_spec(dataset_name).num_classes)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user error here
        raise ConfigError(f"{path} is not a readable state_dict file ({type(error).__name__})") from None
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # a training checkpoint (*.ckpt) or a loop state
    try:
        restore_masks(net, state)
    except (RuntimeError, KeyError) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"{path} does not fit model {model_name}: {first}") from None
    return net.eval(), cfg


class Experiment:
    """One run of an :class:`ExperimentConfig` in a run folder (resumable at any point).

    ``Experiment(cfg, "runs/x").run()`` trains the dense model (or loads it from the
    folder), then runs :func:`relieve` with :func:`nnrelief.training.fit` as the training
    function, each phase with its own per-epoch checkpoint. Killing the process at any
    moment and running again continues after the last finished epoch and yields the same
    history as an uninterrupted run (on CPU).

    Args:
        cfg: the settings.
        run_dir: the run folder; refused if it holds a run with other settings.
        download: download missing datasets.
        progress: tqdm progress bars.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | os.PathLike[str],
        *,
        download: bool = False,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.download = download
        self.progress = progress
        self.device = resolve_device(cfg.device)
        spec = nndata.get_spec(cfg.dataset)
        if cfg.data_dir is None and not spec.packaged:
            raise ConfigError(f"dataset {cfg.dataset!r} needs a data directory (data_dir)")
        self.augment = spec.augment if cfg.augment is None else cfg.augment
        self.train_set, self.val_set, self.test_set = self._load_data()
        _prepare_run_dir(cfg, self.run_dir)
        self.val_batches = self._eval_loader(self.val_set)
        self.test_batches = self._eval_loader(self.test_set)

    def _load_data(self) -> tuple[nndata.TensorDataset, nndata.TensorDataset, nndata.TensorDataset]:
        cfg = self.cfg
        full = nndata.load_dataset(cfg.dataset, cfg.data_dir, "train", download=self.download)
        test = nndata.load_dataset(cfg.dataset, cfg.data_dir, "test", download=self.download)
        train, val = nndata.train_val_split(full, cfg.val_size, seed=cfg.seed)
        if cfg.train_subset is not None:
            if cfg.train_subset >= len(train):
                raise ConfigError(f"train_subset must be < {len(train)} (training samples), got {cfg.train_subset}")
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "subset"))
            order = torch.randperm(len(train), generator=generator)
            train = nndata.subset(train, order[: cfg.train_subset].sort().values)
        if cfg.prune_samples > len(train):
            raise ConfigError(f"prune_samples must be <= {len(train)} (training samples), got {cfg.prune_samples}")
        logger.info("data: %d train, %d validation, %d test samples", len(train), len(val), len(test))
        return train, val, test

    def _eval_loader(self, dataset: nndata.TensorDataset) -> nndata.BatchLoader:
        return nndata.BatchLoader(dataset, _EVAL_BATCH, shuffle=False, seed=0, device=self.device)

    def _train_loader(self, *phase: object) -> nndata.BatchLoader:
        return nndata.BatchLoader(
            self.train_set, self.cfg.batch_size, shuffle=True,
            seed=derive_seed(self.cfg.seed, "batches", *phase), device=self.device,
            augment=self.augment,
        )  # fmt: skip

    def pruning_batches(self, iteration: int) -> nndata.BatchLoader:
        """The pruning set of ``iteration`` (depends only on the seed and the iteration)."""
        pruning_set = nndata.sample_pruning_set(
            self.train_set, self.cfg.prune_samples, seed=derive_seed(self.cfg.seed, "prune", iteration)
        )
        return self._eval_loader(pruning_set)

    def eval_fns(self) -> dict[str, Callable[[nn.Module], float]]:
        """Validation and test accuracy functions (the history's ``val`` and ``test``)."""
        return {
            "val": lambda model: evaluate(model, self.val_batches, self.device).accuracy,
            "test": lambda model: evaluate(model, self.test_batches, self.device).accuracy,
        }

    def accuracies(self, model: nn.Module) -> dict[str, float]:
        """Validation and test accuracy of ``model``."""
        return {name: fn(model) for name, fn in self.eval_fns().items()}

    def initial_model(self) -> nn.Module:
        """The untrained model, built from the seed (stored as ``init.pt``) on the device."""
        torch.manual_seed(derive_seed(self.cfg.seed, "init"))
        model = get_model(self.cfg.model, self.cfg.num_classes)
        path = self.run_dir / "init.pt"
        if path.exists():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            _save_torch(_cpu_state(model), path)
        return model.to(self.device)

    def train_dense(self) -> nn.Module:
        """The dense trained model: loaded from ``trained.pt``, or trained (resumably)."""
        model = self.initial_model()
        trained = self.run_dir / "trained.pt"
        checkpoint = self.run_dir / "dense.ckpt"
        if trained.exists():
            model.load_state_dict(torch.load(trained, map_location="cpu", weights_only=True))
            logger.info("dense model loaded from %s", trained)
        else:
            logger.info("training the dense %s on %s", self.cfg.model, self.cfg.dataset)
            fit(model, self._train_loader("dense"), self.val_batches, self.cfg.train_config(),
                checkpoint_path=checkpoint, progress=self.progress)  # fmt: skip
            _save_torch(_cpu_state(model), trained)
        checkpoint.unlink(missing_ok=True)
        return model

    def _retrain(self, model: nn.Module, iteration: int) -> None:
        for stale in self.run_dir.glob("retrain-*.ckpt"):
            if stale.name != f"retrain-{iteration}.ckpt":
                stale.unlink()
        fit(model, self._train_loader("retrain", iteration), self.val_batches,
            self.cfg.train_config(retrain_iteration=iteration),
            checkpoint_path=self.run_dir / f"retrain-{iteration}.ckpt", progress=self.progress)  # fmt: skip

    def run(self) -> History:
        """Dense training (if not done yet) and the iterative procedure; the history."""
        model = self.train_dense()
        init = None
        if self.cfg.rewind:
            init = torch.load(self.run_dir / "init.pt", map_location="cpu", weights_only=True)

        def finished(record: IterationRecord) -> None:
            (self.run_dir / f"retrain-{record.iteration}.ckpt").unlink(missing_ok=True)

        history = relieve(
            model,
            prune_batches=self.pruning_batches,
            train_fn=self._retrain,
            eval_fns=self.eval_fns(),
            num_iters=self.cfg.num_iters,
            alpha_fc=self.cfg.alpha_fc,
            alpha_conv=self.cfg.alpha_conv,
            score=self.cfg.score,
            rewind_state=init,
            run_dir=self.run_dir,
            early_stop_margin=self.cfg.early_stop_margin,
            progress=self.progress,
            on_iteration_end=finished,
            history_extra={"config": self.cfg.to_dict()},
        )
        for stale in self.run_dir.glob("retrain-*.ckpt"):
            stale.unlink()
        return history
