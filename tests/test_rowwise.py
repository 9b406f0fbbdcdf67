"""Per-row magnitude and Wanda against slow loops written from the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from nnrelief.experiments.rowwise import input_norms, row_magnitude_prune, rows_to_keep, wanda_prune
from nnrelief.pruning.masks import current_mask, set_mask


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


def _slow_wanda_linear(weight: torch.Tensor, inputs: list[torch.Tensor], keep: int, norm: str) -> torch.Tensor:
    """Wanda's rule from the paper, entry by entry: S_ij = |W_ij| * ||X_j||, top ``keep`` per row."""
    rows, cols = weight.shape
    tokens = [x.reshape(-1, cols) for x in inputs]
    feature = []
    for j in range(cols):
        values = [float(t[r, j]) for t in tokens for r in range(t.shape[0])]
        feature.append(math.sqrt(sum(v * v for v in values)) if norm == "l2" else sum(abs(v) for v in values) / len(values))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        scores = [(abs(float(weight[i, j])) * feature[j], -j) for j in range(cols)]
        for _, negative_j in sorted(scores, reverse=True)[:keep]:
            mask[i, -negative_j] = True
    return mask


@pytest.mark.parametrize("norm", ["l2", "mean"])
def test_wanda_linear_matches_the_formula(norm: str) -> None:
    model = _mlp()
    batches = [torch.randn(5, 8) * torch.arange(1, 9), torch.randn(3, 8)]
    hidden = [torch.relu(model[0](x)).detach() for x in batches]
    expected0 = _slow_wanda_linear(model[0].weight.detach(), batches, 3, norm)
    expected2 = _slow_wanda_linear(model[2].weight.detach(), hidden, 5, norm)
    kept = {"0": 3 * 12 + 12, "2": 5 * 4 + 4}
    report = wanda_prune(model, batches, kept, norm=norm)
    assert torch.equal(current_mask(model[0], "weight"), expected0)
    assert torch.equal(current_mask(model[2], "weight"), expected2)
    assert report.kept == sum(kept.values())
    assert bool(current_mask(model[0], "bias").all())


def test_wanda_norms_of_sequences_count_every_token() -> None:
    layer = nn.Linear(4, 2)
    x = torch.randn(2, 7, 4)
    norms = input_norms(nn.Sequential(layer), [x])
    assert torch.allclose(norms.norm("0", "l2").float(), x.reshape(-1, 4).norm(dim=0))
    assert torch.allclose(norms.norm("0", "mean").float(), x.reshape(-1, 4).abs().mean(0))


def test_wanda_conv_with_groups_scales_each_kernel_by_its_input_channel() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    model = nn.Sequential(conv)
    x = torch.randn(2, 4, 5, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1, 1)
    channel = x.transpose(0, 1).reshape(4, -1).norm(dim=1)
    weight = conv.weight.detach()
    wanda_prune(model, [x], {"0": 6 * 5 + 6})
    mask = current_mask(conv, "weight")
    for j in range(6):
        group = j // 3
        scores = torch.stack([weight[j, c].abs() * channel[group * 2 + c] for c in range(2)]).flatten()
        expected = torch.zeros(18, dtype=torch.bool)
        expected[scores.topk(5).indices] = True
        assert torch.equal(mask[j].flatten(), expected), j


def test_gpt2_conv1d_rows_are_output_features() -> None:
    transformers = pytest.importorskip("transformers")
    layer = transformers.pytorch_utils.Conv1D(6, 8)  # weight (in 8, out 6)
    x = torch.randn(3, 8)
    expected = _slow_wanda_linear(layer.weight.detach().t(), [x], 2, "l2")
    wanda_prune(nn.Sequential(layer), [x], {"0": 2 * 6 + 6})
    assert torch.equal(current_mask(layer, "weight").t(), expected)


def test_row_magnitude_keeps_the_largest_per_row_and_never_revives() -> None:
    model = _mlp()
    first = model[0]
    old = torch.rand(first.weight.shape) > 0.3
    set_mask(first, "weight", old)
    row_magnitude_prune(model, {"0": 4 * 12 + 12})
    mask = current_mask(first, "weight")
    assert not bool((mask & ~old).any())
    for i in range(12):
        alive = old[i].nonzero().flatten()
        expected = alive[first.weight.detach()[i, alive].abs().topk(min(4, len(alive))).indices] if len(alive) else alive
        assert set(mask[i].nonzero().flatten().tolist()) == set(expected.tolist())


def test_two_four_keeps_two_of_every_four_inputs_per_row() -> None:
    model = _mlp()
    wanda_prune(model, [torch.randn(6, 8)], {"0": 0}, nm=(2, 4))
    mask = current_mask(model[0], "weight")
    assert torch.equal(mask.view(12, 2, 4).sum(dim=2), torch.full((12, 2), 2))
    with pytest.raises(ValueError, match="divisible by 5"):
        row_magnitude_prune(model, {"2": 0}, nm=(1, 5))


def test_rows_to_keep_leaves_the_biases() -> None:
    layer = nn.Linear(10, 4)
    assert rows_to_keep(layer, 4 * 3 + 4) == 3
    assert rows_to_keep(layer, 2) == 0


def test_unknown_layer_or_no_target_is_refused_before_anything_changes() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="no prunable layer called 9"):
        wanda_prune(model, [torch.randn(2, 8)], {"9": 3})
    with pytest.raises(ValueError, match="give kept"):
        row_magnitude_prune(model)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
