"""scripts/pass_damage.py's BatchNorm recomputation against the formula: the running mean and
variance become the plain average of the first ``limit`` batches' statistics."""

import importlib.util
from pathlib import Path

import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pass_damage.py"
spec = importlib.util.spec_from_file_location("pass_damage", SCRIPT)
pass_damage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pass_damage)


def test_recomputed_statistics_are_the_average_of_the_batches_used() -> None:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(3, momentum=0.3)
    dropout = nn.Dropout(0.5)
    model = nn.Sequential(dropout, norm)
    batches = [(torch.randn(8, 3) * (k + 1) + k, torch.zeros(8)) for k in range(3)]
    assert pass_damage.recompute_batchnorm(model, batches, limit=2) == 2
    first, second = batches[0][0], batches[1][0]  # the third is past the limit; dropout stayed off
    torch.testing.assert_close(norm.running_mean, (first.mean(0) + second.mean(0)) / 2)
    torch.testing.assert_close(norm.running_var, (first.var(0) + second.var(0)) / 2)
    assert norm.momentum == 0.3 and not model.training and not norm.training and not dropout.training
