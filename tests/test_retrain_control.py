"""scripts/retrain_control.py: the run it reads stays as it was, retraining changes the
dense model, and a control stopped after a phase resumes to the uninterrupted result."""

import os
import subprocess
import sys
from pathlib import Path

from nnrelief.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "retrain_control.py"
TINY = [
    "--model", "lenet300_100", "--dataset", "mnist-sample", "--epochs", "1", "--retrain-epochs", "1",
    "--milestones", "--retrain-milestones", "--batch-size", "50", "--train-subset", "300", "--val-size", "100",
    "--prune-samples", "100", "--device", "cpu", "--no-progress", "-q",
]  # fmt: skip


def control(run_dir: Path, out_dir: Path, iterations: int) -> list[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), str(run_dir), str(out_dir), "--iterations", str(iterations)],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[2:]  # the "phase  val  test" rows


def test_control_reads_only_and_resumes_to_the_same_figures(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run_dir)]) == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    whole = control(run_dir, tmp_path / "whole", 2)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert [row.split()[0] for row in whole] == ["0", "1", "2"]
    assert whole[0].split()[1:] != whole[2].split()[1:]  # retraining moved the accuracies
    control(run_dir, tmp_path / "stopped", 1)
    assert control(run_dir, tmp_path / "stopped", 2) == whole
    assert not list((tmp_path / "stopped").glob("*.ckpt"))
