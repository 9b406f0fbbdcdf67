"""Run folders as the figures see them: settings and history (:func:`load_run`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..experiments import runfolder as files
from ..experiments.config import ConfigError, ExperimentConfig
from ..experiments.experiment import recorded_settings, stored_config
from ..experiments.history import History
from ..experiments.runfolder import RunFolder


@dataclass
class RunData:
    """A finished (or running) run folder: its settings and history."""

    path: Path
    config: ExperimentConfig
    history: History

    @property
    def label(self) -> str:
        """Legend label: model, optimizer and seed (plus alpha when not the default)."""
        cfg = self.config
        alpha = f", alpha_fc {cfg.alpha_fc:g}" + (f"/conv {cfg.alpha_conv:g}" if _has_conv(self) else "")
        return f"{cfg.model}, {cfg.optimizer}, seed {cfg.seed}{alpha}"

    @property
    def name(self) -> str:
        """The folder name."""
        return self.path.name


def _has_conv(run: RunData) -> bool:
    report = run.history.records[-1].report if run.history.records else None
    return bool(report) and any(layer["kind"] == "conv" for layer in report["layers"])


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read ``config.json`` and ``history.json`` of a run folder (nothing is written)."""
    folder = RunFolder(run_dir)
    for needed in (files.CONFIG, files.HISTORY_JSON):
        if not folder.exists(needed):
            raise ConfigError(f"{folder.path} is not a finished run folder: {needed} is missing")
    config = stored_config(folder)
    recorded = recorded_settings(folder)  # the latest invocation's number of iterations
    if recorded is not None and isinstance(recorded.get("num_iters"), int):
        config = dataclasses.replace(config, num_iters=recorded["num_iters"])
    return RunData(folder.path, config, folder.read_history())


def unique_labels(runs: Sequence[RunData]) -> list[str]:
    labels = [run.label for run in runs]
    return [f"{label} ({run.name})" if labels.count(label) > 1 else label for label, run in zip(labels, runs)]
