"""The iterative NNrelief procedure for any model and training function.

:func:`relieve` runs ``num_iters`` times one pruning pass (:func:`nnrelief.prune`), measures
the accuracies before retraining, optionally rewinds the surviving weights to their initial
values (:func:`rewind`), calls the user's ``train_fn`` and measures again. Every iteration
becomes an :class:`~nnrelief.experiments.history.IterationRecord` of a :class:`~nnrelief.experiments.history.History`.
With ``run_dir`` it stores its state after every step (pruned, retrained), atomically, and
resumes from it. The paper's experiments end to end (data, dense training, this loop, run
folders, presets) are in :mod:`nnrelief.experiments.experiment`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..fileio import cpu_state
from ..pruning.choices import UnreachableTargetError
from ..pruning.masks import GATE, hold_masks, is_masked, make_permanent, restore_masks, split_masks
from ..pruning.pass_settings import DEFAULTS, PassSettings
from ..pruning.prune import prune
from ..pruning.report import PruneReport
from . import runfolder as files
from .history import History, IterationRecord, measure
from .runfolder import DamagedFileError, RunFolder

logger = logging.getLogger(__name__)

_STATE_FORMAT = 1


def rewind(model: nn.Module, init_state: Mapping[str, Tensor]) -> None:
    """Reset the surviving weights of ``model`` to their initial values, keeping the masks.

    Every parameter and buffer found in ``init_state`` (the ``state_dict`` of the model before
    training, in any of nnrelief's formats) is copied back, then the masked entries are zeroed
    again. Masks and shortcut gates are left untouched.
    """
    init, _ = split_masks(init_state)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key in init and key.rpartition(".")[2] != GATE:
                value.copy_(init[key].to(value.device, value.dtype))
            elif key not in init and _is_masked_key(model, key):
                raise KeyError(f"rewind: initial state has no entry for {key!r}")
    hold_masks(model)


def _is_masked_key(model: nn.Module, key: str) -> bool:
    prefix, _, name = key.rpartition(".")
    return is_masked(model.get_submodule(prefix), name)


def _load_earlier(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Set the model back to a state saved before the latest pruning pass: its weights, masks
    and gates (a gate the earlier state lacks is opened)."""
    loaded = dict(state)
    for key, value in model.state_dict().items():
        if key.rpartition(".")[2] == GATE and key not in loaded:
            loaded[key] = torch.ones_like(value)
    make_permanent(model)
    restore_masks(model, loaded, infer=False)


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


PruneStep = Callable[[nn.Module, int], PruneReport]
"""Prunes a model in place for an iteration (1, 2, ...) and returns the pass's report."""


def relieve(
    model: nn.Module,
    *,
    prune_batches: Iterable[Any] | Callable[[int], Iterable[Any]] | None = None,
    train_fn: Callable[[nn.Module, int], object],
    eval_fns: Mapping[str, Callable[[nn.Module], float]],
    num_iters: int,
    settings: PassSettings = DEFAULTS,
    prune_step: PruneStep | None = None,
    step_settings: Mapping[str, Any] | None = None,
    rewind_state: Mapping[str, Tensor] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    early_stop_margin: float | None = None,
    early_stop_metric: str = "val",
    input_shape: tuple[int, ...] | None = None,
    progress: bool = True,
    progress_label: str = "nnrelief",
    on_iteration_end: Callable[[IterationRecord], None] | None = None,
    history_extra: Mapping[str, Any] | None = None,
) -> History:
    """Iterative NNrelief on a trained ``model``, in place: prune, retrain, repeat.

    Iteration 0 records the model as given. Then ``num_iters`` times: one pruning pass on
    the pruning set, evaluation ("before"), rewinding to ``rewind_state`` if given,
    ``train_fn(model, iteration)``, evaluation ("after"). The masks hold during training
    with any ``torch.optim`` optimizer (:mod:`nnrelief.pruning.masks`), so ``train_fn`` may be any ordinary loop over
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
        settings: the settings of every pass (:class:`~nnrelief.pruning.pass_settings.PassSettings`:
            alphas, score, layers spared or pruned alone, per-layer alphas, a remaining
            fraction per pass).
        prune_step: another pruning rule instead of NNrelief's pass, e.g. a baseline
            (:mod:`nnrelief.experiments.baselines`); ``prune_batches`` and the alphas are
            then unused and ``input_shape`` is required.
        step_settings: what identifies ``prune_step`` (stored with the run state, so a run
            folder is never resumed with another rule).
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
        progress_label: the method named on the iteration bar ("<label> iterations"), e.g.
            a baseline's name with a ``prune_step``.
        on_iteration_end: called with each finished record after its state is stored.
        history_extra: extra keys written into ``history.json`` (e.g. the configuration).

    Returns:
        The :class:`History`; ``model`` holds the weights of ``history.selected_iteration``.
    """
    _check_arguments(num_iters, eval_fns, early_stop_margin, early_stop_metric)
    if prune_step is None:
        if prune_batches is None:
            raise ValueError("give prune_batches (the pruning set) or a prune_step")
        prune_step = _nnrelief_step(prune_batches, settings, progress)
        shape = tuple(input_shape) if input_shape is not None else _input_shape(_batches_for(prune_batches, 1))
        stored = settings.loop_settings()
    else:
        if input_shape is None:
            raise ValueError("give input_shape with a prune_step (the shape of one input, for counting MACs)")
        shape, stored = tuple(input_shape), {"prune_step": dict(step_settings or {})}
    stored.update(rewind=rewind_state is not None, early_stop_margin=early_stop_margin,
                  early_stop_metric=early_stop_metric, eval=sorted(eval_fns))  # fmt: skip
    folder = RunFolder(run_dir).open_for_writing() if run_dir is not None else None
    try:
        loop = _Loop(model, prune_step, train_fn, eval_fns, shape, stored, rewind_state, folder, history_extra)
        loop.start(num_iters)
        bar = {"desc": f"{progress_label} iterations", "disable": None if progress else True}
        return loop.run(num_iters, early_stop_margin, early_stop_metric, bar, on_iteration_end)
    finally:
        if folder is not None:
            folder.close()


def _check_arguments(num_iters: int, eval_fns: Mapping[str, Any], margin: float | None, metric: str) -> None:
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    if not eval_fns:
        raise ValueError("eval_fns must name at least one evaluation, e.g. {'val': ...}")
    if margin is not None:
        if margin < 0:
            raise ValueError(f"early_stop_margin must be >= 0, got {margin}")
        if metric not in eval_fns:
            raise ValueError(f"early_stop_metric {metric!r} is not one of {sorted(eval_fns)}")


def _batches_for(prune_batches: Iterable[Any] | Callable[[int], Iterable[Any]], iteration: int) -> Iterable[Any]:
    return prune_batches(iteration) if callable(prune_batches) else prune_batches


def _nnrelief_step(prune_batches: Iterable[Any] | Callable[[int], Iterable[Any]], settings: PassSettings, progress: bool) -> PruneStep:
    def step(model: nn.Module, iteration: int) -> PruneReport:
        # prune() shows its bar whenever asked, even when stderr is not a terminal
        keywords = settings.at_iteration(iteration).keywords()

        def run(**changed: Any) -> PruneReport:
            return prune(model, _batches_for(prune_batches, iteration), progress=progress and sys.stderr.isatty(),
                         **{**keywords, **changed})  # fmt: skip

        try:
            return run()
        except UnreachableTargetError as error:  # an earlier pass went below this one's target: keep what is left
            logger.warning("iteration %d: %s; this pass keeps what it can", iteration, error)
            return run(target=error.remaining)

    return step


class _Loop:
    """The state of one :func:`relieve` call and its phases: start (or resume), prune,
    retrain, early stop; each phase ends by storing the state (its commit point)."""

    def __init__(
        self, model: nn.Module, prune_step: PruneStep, train_fn: Callable[[nn.Module, int], object],
        eval_fns: Mapping[str, Callable[[nn.Module], float]], shape: tuple[int, ...], settings: dict[str, Any],
        rewind_state: Mapping[str, Tensor] | None, folder: RunFolder | None, extra: Mapping[str, Any] | None,
    ) -> None:  # fmt: skip
        self.model, self.prune_step, self.train_fn, self.eval_fns = model, prune_step, train_fn, eval_fns
        self.shape, self.settings, self.rewind_state = shape, settings, rewind_state
        self.folder, self.extra = folder, extra
        self.history = History()
        self.phase = "retrained"
        self.pending: IterationRecord | None = None
        self.previous: dict[str, Tensor] | None = None

    def evaluate(self) -> dict[str, float]:
        return {name: float(fn(self.model)) for name, fn in self.eval_fns.items()}

    def save(self) -> None:
        """Store the loop state after the files it names (weights, history)."""
        if self.folder is None:
            return
        if self.phase == "retrained":
            self.folder.save(files.model_file(self.history.records[-1].iteration), cpu_state(self.model))
        if self.phase != "pruned":
            self.folder.write_history(self.history, self.extra)
        pending = self.pending.to_dict() if self.pending is not None else None
        self.folder.save(files.STATE, {
            "format": _STATE_FORMAT, "settings": self.settings, "phase": self.phase, "model": cpu_state(self.model),
            "previous": self.previous, "history": self.history.to_dict(), "pending": pending,
        })  # fmt: skip

    def start(self, num_iters: int) -> None:
        """Resume from the folder's state, or record iteration 0; refuse a folder that is not
        writable before any work it would have to store."""
        if self.folder is not None and (self.folder.exists(files.STATE) or self._state_lost()):
            kept_state = self._resume()
            left = self._work_left(num_iters)
            if left is not None:
                self.folder.require_writable(left)
            self.folder.write_history(self.history, self.extra)  # repairs damaged history files
            if self.phase != "pruned":
                self._check_model_files(kept_state)
            return
        if self.folder is not None:
            self.folder.require_writable("the run has not started")
        start = time.perf_counter()
        accuracy = self.evaluate()
        record = IterationRecord(0, dict(accuracy), dict(accuracy), **measure(self.model, self.shape))
        record.seconds = time.perf_counter() - start
        self.history = History([record])
        self.save()
        logger.info("iteration 0 (dense): %s", _describe(record))

    def _state_lost(self) -> bool:
        """Whether the state is gone while the history shows pruning iterations (then it is
        rebuilt; a history of iteration 0 alone is what a kill before the first state leaves)."""
        assert self.folder is not None
        try:
            return self.folder.exists(files.HISTORY_JSON) and len(self.folder.read_history().records) > 1
        except DamagedFileError:
            return False

    def _work_left(self, num_iters: int) -> str | None:
        done = self.history.records[-1].iteration
        if self.phase == "stopped" or done >= num_iters:
            return None  # a pruned iteration beyond num_iters waits, unretrained, for a longer run
        if self.phase == "pruned":
            assert self.pending is not None
            return f"iteration {self.pending.iteration} is to be retrained"
        return f"iterations {done + 1}-{num_iters} are left"

    def _resume(self) -> Mapping[str, Tensor]:
        """Load the folder's state (rebuilt if damaged); the model it holds."""
        assert self.folder is not None
        path = self.folder / files.STATE
        try:
            state = self.folder.load(files.STATE)
        except FileNotFoundError:
            state = self._rebuilt_state(DamagedFileError(path, f"{path} is missing (its history is there)"))
        except DamagedFileError as damage:
            state = self._rebuilt_state(damage)
        _check_state(state, self.settings, self.folder / files.STATE)
        restore_masks(self.model, state["model"], infer=False)
        self.history = History.from_dict(state["history"])
        self.phase, self.previous = state["phase"], state["previous"]
        self.pending = IterationRecord.from_dict(state["pending"]) if state["pending"] else None
        logger.info(
            "resuming %s: %d iteration(s) done%s", self.folder.path, self.history.records[-1].iteration,
            f", iteration {self.pending.iteration} pruned but not retrained" if self.pending else "",
        )  # fmt: skip
        return state["model"]

    def _kept_iteration(self) -> int:
        """The iteration whose weights the model holds after a finished iteration."""
        return self.history.selected_iteration if self.phase == "stopped" else self.history.records[-1].iteration

    def _rebuilt_state(self, damage: DamagedFileError) -> dict[str, Any]:
        """The state after the last finished iteration, from its weights and ``history.json``."""
        assert self.folder is not None
        try:
            history = self.folder.read_history()
            stopped = history.stopped_early
            kept = history.selected_iteration if stopped else history.records[-1].iteration
            model = self.folder.load(files.model_file(kept))
        except (DamagedFileError, FileNotFoundError) as error:
            reason = error.problem if isinstance(error, DamagedFileError) else error
            raise DamagedFileError(damage.path, f"{damage.problem}, and it cannot be rebuilt ({reason})",
                                   "restore it from a copy, or start the run over in a new folder") from None  # fmt: skip
        state = {"format": _STATE_FORMAT, "settings": self.settings, "phase": "stopped" if stopped else "retrained",
                 "model": model, "previous": None, "history": history.to_dict(), "pending": None}  # fmt: skip
        self.folder.rebuild(files.STATE, state, damage, source=f"{files.model_file(kept)} and {files.HISTORY_JSON}",
                            exact=False)  # fmt: skip
        return state

    def _check_model_files(self, kept_state: Mapping[str, Tensor]) -> None:
        """Rebuild the model file of the kept iteration from the state if it is damaged or
        missing; name any other damaged model file (the run goes on without it; a deleted
        one is not missed)."""
        assert self.folder is not None
        kept = self._kept_iteration()
        for record in self.history.records:
            name = files.model_file(record.iteration)
            missing = record.iteration == kept and not self.folder.exists(name)
            damage = DamagedFileError(self.folder / name, f"{self.folder / name} is missing") if missing else None
            damage = damage or self.folder.damaged(name)
            if damage is None:
                continue
            if record.iteration == kept:
                self.folder.rebuild(name, dict(kept_state), damage, source=files.STATE)
            else:
                logger.warning("%s; the run goes on without it", damage)

    def run(
        self, num_iters: int, margin: float | None, metric: str, bar_options: Mapping[str, Any],
        on_iteration_end: Callable[[IterationRecord], None] | None,
    ) -> History:  # fmt: skip
        done = self.history.records[-1].iteration
        bar = tqdm(total=num_iters, initial=min(done, num_iters), unit="iter", **bar_options)
        try:
            while not self.history.stopped_early and done < num_iters:
                if self.phase != "pruned":
                    self.prune(done + 1, keep_previous=margin is not None)
                finished = self.retrain()
                done = finished.iteration
                self.phase = "stopped" if margin is not None and self.stop_early(finished, margin, metric) else "retrained"
                self.save()
                self.previous = None
                bar.update(1)
                if on_iteration_end is not None:
                    on_iteration_end(finished)
        finally:
            bar.close()
        return self.history

    def prune(self, iteration: int, keep_previous: bool) -> None:
        start = time.perf_counter()
        self.previous = cpu_state(self.model) if keep_previous else None
        report = self.prune_step(self.model, iteration)
        prune_seconds = time.perf_counter() - start
        accuracy = self.evaluate()
        self.pending = IterationRecord(
            iteration, accuracy, {}, **measure(self.model, self.shape), prune_seconds=prune_seconds, report=report.to_dict(),
        )  # fmt: skip
        self.pending.seconds = time.perf_counter() - start
        self.phase = "pruned"
        self.save()
        logger.info("iteration %d pruned: %s", iteration, _describe(self.pending, before=True))

    def retrain(self) -> IterationRecord:
        record = self.pending
        assert record is not None
        start = time.perf_counter()
        if self.rewind_state is not None:
            rewind(self.model, self.rewind_state)
        self.train_fn(self.model, record.iteration)
        hold_masks(self.model)  # a user's train_fn may have replaced or copied modules
        record.retrain_seconds = time.perf_counter() - start
        record.accuracy_after = self.evaluate()
        record.seconds += time.perf_counter() - start
        self.history.records.append(record)
        self.history.selected_iteration = record.iteration
        self.pending = None
        logger.info("iteration %d retrained: %s", record.iteration, _describe(record))
        return record

    def stop_early(self, record: IterationRecord, margin: float, metric: str) -> bool:
        """Whether ``record`` fell below the margin; if so, go back to the previous iteration."""
        reference = self.history.records[0].accuracy_after[metric]
        if record.accuracy_after[metric] >= reference - margin:
            return False
        if self.folder is not None:
            self.folder.save(files.model_file(record.iteration), cpu_state(self.model))
        assert self.previous is not None
        _load_earlier(self.model, self.previous)
        self.history.stopped_early = True
        self.history.selected_iteration = record.iteration - 1
        logger.info(
            "early stop: %s accuracy %.4f is more than %.4f below the dense %.4f; keeping iteration %d",
            metric, record.accuracy_after[metric], margin, reference, record.iteration - 1,
        )  # fmt: skip
        return True


def _describe(record: IterationRecord, before: bool = False) -> str:
    accuracy = record.accuracy_before if before else record.accuracy_after
    parts = [f"{name} acc {value:.4f}" for name, value in accuracy.items()]
    parts.append(f"{record.params_remaining}/{record.params_total} params ({record.remaining_percent:.2f}%)")
    return ", ".join(parts)
