"""Train once, prune many ways: runs that train the dense model the same way share it
(experiments.dense); shortening a run's iterations, and re-running a finished command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nnrelief.experiments.experiment as experiment_module
from nnrelief.experiments import runfolder as files
from nnrelief.experiments.dense import dense_name
from nnrelief.experiments.experiment import Experiment
from nnrelief.reporting.runs import load_run
from test_iterative import small_config


def _count_fits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which phases ``fit`` ran ("dense" or "retrain"), in order."""
    phases: list[str] = []
    fit = experiment_module.fit

    def counting(*args, **kwargs):
        phases.append("dense" if kwargs.get("desc") == "dense training" else "retrain")
        return fit(*args, **kwargs)

    monkeypatch.setattr(experiment_module, "fit", counting)
    return phases


def test_runs_that_differ_in_pruning_share_one_dense_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    phases = _count_fits(monkeypatch)
    Experiment(small_config(num_iters=1), tmp_path / "a", progress=False).run()
    Experiment(small_config(num_iters=1, alpha_fc=0.8, retrain_epochs=2), tmp_path / "b", progress=False).run()
    assert phases.count("dense") == 1, phases
    shared = tmp_path / "dense" / dense_name(small_config())
    assert json.loads((shared / files.DENSE_SETTINGS).read_text())["epochs"] == 2
    trained = torch.load(shared / files.TRAINED)
    for run in ("a", "b"):
        copy = torch.load(tmp_path / run / files.TRAINED)
        assert all(torch.equal(copy[key], trained[key]) for key in trained)
    Experiment(small_config(num_iters=1, epochs=3), tmp_path / "c", progress=False).run()
    assert phases.count("dense") == 2  # other training settings: another dense model
    assert len(list((tmp_path / "dense").iterdir())) == 2


def test_a_run_with_its_own_dense_model_resumes_without_the_shared_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Experiment(small_config(num_iters=1), tmp_path / "run", progress=False).run()
    for path in (tmp_path / "dense").rglob("*"):
        if path.is_file():
            path.unlink()  # as a run folder written before dense models were shared
    phases = _count_fits(monkeypatch)
    history = Experiment(small_config(num_iters=2), tmp_path / "run", progress=False).run()
    assert phases == ["retrain"] and len(history.records) == 3
    assert not any(path.is_file() for path in (tmp_path / "dense").rglob("*"))


def test_a_shortened_run_records_what_ran(tmp_path: Path) -> None:
    Experiment(small_config(num_iters=2), tmp_path / "run", progress=False).run()
    shorter = Experiment(small_config(num_iters=1), tmp_path / "run", progress=False)
    assert shorter.finished() is not None
    history = shorter.run()
    shorter.close()
    assert len(history.records) == 3  # nothing is thrown away
    assert load_run(tmp_path / "run").config.num_iters == 2  # the report reads "2 iterations (finished)"
    longer = Experiment(small_config(num_iters=3), tmp_path / "run", progress=False)
    assert longer.finished() is None
    longer.close()


def _modified(folder: Path) -> dict[str, int]:
    """Modification times of the run's files (its lock file records who holds it)."""
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir() if path.name != files.LOCK}


def test_rerunning_a_finished_command_says_so_and_computes_nothing(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "nnrelief", "--threads", "1", "prune", "--preset", "demo", "--epochs", "1",
               "--retrain-epochs", "1", "--num-iters", "1", "--no-progress", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    before = _modified(tmp_path / "run")
    again = subprocess.run(command, check=True, capture_output=True, text=True)
    assert again.stdout.strip().splitlines()[-1] == f"{tmp_path / 'run'}: already finished (1 iteration, selected model-iter1.pt); nothing to do"
    assert _modified(tmp_path / "run") == before


def test_a_run_waits_for_the_shared_dense_model_another_run_is_training(tmp_path: Path) -> None:
    def start(alpha: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "nnrelief", "--threads", "1", "prune", "--preset", "demo", "--epochs", "2",
                   "--retrain-epochs", "1", "--num-iters", "1", "--alpha-fc", alpha, "--no-progress", "-v",
                   "--run-dir", str(tmp_path / f"alpha-{alpha}")]  # fmt: skip
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = [start("0.9"), start("0.8")]  # started together: one trains, the other waits for it
    errors = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert sum(err.count("training the dense") for err in errors) == 1, errors
    assert len(list((tmp_path / "dense").iterdir())) == 1


def test_a_run_stopped_early_and_shortened_reads_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    retrain = Experiment.retrain

    def interrupted(self, model, iteration, *args, **kwargs):
        if iteration == 2:
            raise KeyboardInterrupt  # the run is stopped during iteration 2
        return retrain(self, model, iteration, *args, **kwargs)

    monkeypatch.setattr(Experiment, "retrain", interrupted)
    with pytest.raises(KeyboardInterrupt), Experiment(small_config(num_iters=3), tmp_path / "run", progress=False) as run:
        run.run()
    monkeypatch.setattr(Experiment, "retrain", retrain)
    assert load_run(tmp_path / "run").config.num_iters == 3  # "1 of 3 iterations (in progress)"
    with Experiment(small_config(num_iters=1), tmp_path / "run", progress=False) as shorter:
        done = shorter.finished()
        assert done is not None and done.records[-1].iteration == 1
        shorter.record_finished(done)
    assert load_run(tmp_path / "run").config.num_iters == 1  # "1 iteration (finished)", --num-iters 1 in its command
