"""The dense model shared by every run that trains it the same way.

Runs differing only in how they prune (alphas, score, retraining, pruning samples,
rewinding, number of iterations) start from the same dense model. It is trained once, in
``<parent of the run folder>/dense/<model>-<dataset>-<hash>/`` (:func:`dense_folder`; the
hash covers :data:`DENSE_FIELDS`), a folder of its own with its own lock (``.lock``, held
while it trains: a second run with the same training settings is told which process
holds it) and checksums; ``dense.json`` there holds the settings it was trained with. Each
run folder gets a copy of ``init.pt`` and ``trained.pt``, so it stays complete on its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import LATER_FIELDS, ExperimentConfig

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
