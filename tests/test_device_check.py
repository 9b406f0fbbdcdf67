"""scripts/device_check.sh on a machine without a GPU: valid bash, clear refusals, dry run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_missing_data_is_refused(tmp_path: Path) -> None:
    result = run(str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2 and "is not a directory" in result.stderr
    result = run(str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "cifar-10-batches-py not found" in result.stderr
    assert not (tmp_path / "device-out").exists()


def test_dry_run_lists_every_step_within_six_minutes(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    result = run("--dry-run", str(tmp_path), str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(",")[0] for line in lines] == ["[cuda-tests", "[prune-pass", "[train-epoch", "[pruning-run"]
    assert "-m pytest -m cuda" in lines[0] and all("--device cuda" in line for line in lines[1:])
    assert "--amp bf16 --epochs 10" in lines[3] and "--retrain-epochs 3" in lines[3] and "--num-iters 2" in lines[3]
    limits = [int(line.split("at most ")[1].split("s]")[0]) for line in lines]
    assert sum(limits) <= 360
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_stops_before_writing(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    result = run(str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "CUDA is not available" in result.stderr
    assert not (tmp_path / "device-out").exists()
