"""The dense model shared by every run that trains it the same way.

Runs differing only in how they prune (alphas, score, retraining, pruning samples,
rewinding, number of iterations) start from the same dense model. It is trained once, in
``<parent of the run folder>/dense/<model>-<dataset>-<hash>/`` (:func:`dense_folder`; the
hash covers :data:`DENSE_FIELDS`), a folder of its own with its own lock (``.lock``, held
while it trains: a second run with the same training settings is told which process
holds it) and checksums; ``dense.json`` there holds the settings it was trained with. Each
run folder gets a copy of ``init.pt`` and ``trained.pt``, so it stays complete on its own
(:func:`shared_dense_state` reads or trains it under that lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import from_main
from ..fileio import cpu_state
from . import runfolder as files
from .config import LATER_FIELDS, ExperimentConfig, RunConflictError
from .runfolder import DamagedFileError, RunFolder, RunLockedError

log = logging.getLogger(__name__)

# The settings that shape the dense phase: the model, its data (split, subset, augmentation),
# its initialisation and batch order (the seed) and every setting of its training.
DENSE_FIELDS = (
    "model", "dataset", "val_size", "train_subset", "augment", "seed", "epochs", "optimizer", "lr", "momentum",
    "weight_decay", "batch_size", "milestones", "gamma", "lr_schedule", "amp", "compile", "steps_per_epoch",
)  # fmt: skip
# Dense settings added after shared dense folders existed: their dense.json lacks them, so
# they are recorded only when they differ from these defaults.
_LATER_DENSE_FIELDS = {"steps_per_epoch": None}
SHARED_FOLDER = "dense"


def dense_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """The settings of ``cfg`` that shape its dense model."""
    values = cfg.to_dict()
    return {
        name: values[name]
        for name in DENSE_FIELDS
        if not (name in _LATER_DENSE_FIELDS and _LATER_DENSE_FIELDS[name] == values[name])
    }


def dense_name(cfg: ExperimentConfig) -> str:
    """``<model>-<dataset>-<hash>``: one name per dense model (settings added after the first
    release count only when they differ from their old default, as in run folder names)."""
    fixed = {k: v for k, v in dense_settings(cfg).items() if not (k in LATER_FIELDS and LATER_FIELDS[k] == v)}
    digest = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.model}-{cfg.dataset}-{digest}"


def dense_folder(run_dir: Path, cfg: ExperimentConfig) -> Path:
    """Where the dense model of ``cfg`` is trained and kept for the runs beside ``run_dir``."""
    return Path(run_dir).parent / SHARED_FOLDER / dense_name(cfg)


_WAIT_SECONDS = 2.0


def lock_shared_folder(shared: RunFolder, wait_for_weights: bool = True) -> bool:
    """Take the shared dense folder's lock (rank 0), waiting while another run holds it;
    True, without the lock, if its trained weights are there meanwhile (``wait_for_weights``)."""
    told = False
    while True:
        try:
            shared.open_for_writing()  # also removes what a killed write there left
            return False
        except RunLockedError as error:
            if wait_for_weights and (shared.path / files.TRAINED).exists():
                return True  # another run reading it, or trained meanwhile: reading it too is safe (writes are atomic)
            if not told:
                log.warning("waiting for another run training the shared dense model %s (%s)", shared.path, error)
                told = True
            time.sleep(_WAIT_SECONDS)


def shared_weights(shared: RunFolder) -> dict[str, torch.Tensor] | None:
    """The trained weights of a shared dense folder; None if not there or damaged (said)."""
    if not shared.exists(files.TRAINED):
        return None
    try:
        state = shared.load(files.TRAINED)
    except DamagedFileError as damage:
        log.warning("%s; the dense model is trained again", damage.problem)
        return None
    log.info("dense model shared with the runs trained the same way: %s", shared / files.TRAINED)
    return state


def claim_dense_folder(cfg: ExperimentConfig, shared: RunFolder) -> None:
    """Record the dense settings in a new shared dense folder; refuse one that holds others."""
    settings = dense_settings(cfg)
    if not shared.exists(files.DENSE_SETTINGS):
        shared.require_writable("its dense model is not trained yet")
        shared.write_json(files.DENSE_SETTINGS, settings)
        return
    try:
        stored = shared.read_json(files.DENSE_SETTINGS)
    except DamagedFileError as damage:  # the folder's name is the hash of these settings: they are its own
        shared.require_writable(f"{damage.path} is damaged")
        log.warning("%s; rewritten from this run's settings (the folder's name is their hash)", damage.problem)
        shared.write_json(files.DENSE_SETTINGS, settings)
        return
    if stored != settings:
        raise RunConflictError(f"shared dense folder {shared.path} holds a dense model trained with other settings "
                               f"({files.DENSE_SETTINGS}: {stored}); move or delete it")  # fmt: skip


def shared_dense_state(
    cfg: ExperimentConfig, run_dir: Path, model: nn.Module, train: Callable[[nn.Module, RunFolder], None]
) -> dict[str, torch.Tensor]:
    """The trained weights in the shared dense folder of ``cfg`` beside ``run_dir`` (read under
    its lock, held briefly), trained there first by ``train(model, folder)`` from ``model``'s
    initial weights if they are not there yet. While another run trains it, this one waits."""
    shared = RunFolder(dense_folder(run_dir, cfg))
    if from_main(lock_shared_folder, shared):
        state = shared_weights(shared)  # trained by the run that held the lock
        if state is not None:
            return state
        from_main(lock_shared_folder, shared, wait_for_weights=False)
    try:
        from_main(claim_dense_folder, cfg, shared)
        state = shared_weights(shared)
        if state is not None:
            shared.remove(files.DENSE_CHECKPOINT)  # a kill after trained.pt can leave it
            return state
        shared.require_writable("its dense model is not trained yet")
        shared.drop_if_damaged(files.TRAINED)
        if not shared.exists(files.INIT):
            shared.save(files.INIT, cpu_state(model))
        train(model, shared)
        state = cpu_state(model)
        shared.save(files.TRAINED, state)
        shared.remove(files.DENSE_CHECKPOINT)
        return state
    finally:
        shared.close()
