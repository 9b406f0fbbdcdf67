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

from ..fileio import cpu_state, save_torch
from ..masks import GATE, refresh_masked, restore_masks
from ..pruning import SCORE_MODES, prune
from .history import History, IterationRecord, measure

logger = logging.getLogger(__name__)

STATE_FILE = "relief_state.pt"
_STATE_FORMAT = 1


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
            save_torch(cpu_state(model), folder / f"model-iter{history.records[-1].iteration}.pt")
        if phase != "pruned":
            history.write(folder, history_extra)
        save_torch(
            {
                "format": _STATE_FORMAT,
                "settings": settings,
                "phase": phase,
                "model": cpu_state(model),
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
        record = IterationRecord(0, dict(accuracy), dict(accuracy), **measure(model, shape))
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
                previous = cpu_state(model) if early_stop_margin is not None else None
                # prune() shows its bar whenever asked, even when stderr is not a terminal
                report = prune(model, batches_for(iteration), alpha_fc=alpha_fc, alpha_conv=alpha_conv,
                               score=score, progress=progress and sys.stderr.isatty())  # fmt: skip
                prune_seconds = time.perf_counter() - start
                accuracy = evaluate_all()
                pending = IterationRecord(
                    iteration, accuracy, {}, **measure(model, shape),
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
                    save_torch(cpu_state(model), folder / f"model-iter{done}.pt")
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