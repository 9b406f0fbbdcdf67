"""L1-norm filter pruning (the ``l1-filter`` baseline of ``nnrelief compare``)."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import nnrelief
from nnrelief.experiments.l1_filter import (
    bisect_fraction,
    breakpoints,
    filter_l1_norms,
    filter_layers,
    l1_filter_prune,
    removal_counts,
)
from nnrelief.experiments.methods import Targets
from nnrelief.metrics import effective_tensor, summarize
from nnrelief.models import lenet300_100, resnet20
from nnrelief.pruning.masks import current_mask
from nnrelief.pruning.prune import SPARED

SHAPE = (1, 4, 4)


def test_l1_norms_by_hand():
    weight = torch.tensor([[[[1.0, -2.0]], [[0.5, 0.0]]], [[[-3.0, 0.0]], [[0.0, 0.25]]]])  # (2, 2, 1, 2)
    assert filter_l1_norms(weight).tolist() == [3.5, 3.25]


def test_removal_counts_round_halves_up_and_keep_a_filter():
    assert removal_counts(Fraction(1, 2), [4, 3, 1]) == [2, 2, 0]  # 1.5 -> 2; a single filter stays
    assert removal_counts(Fraction(1, 8), [4, 3]) == [1, 0]  # 0.5 -> 1, 0.375 -> 0
    assert removal_counts(Fraction(1), [4, 3]) == [3, 2]
    assert removal_counts(Fraction(0), [4, 3]) == [0, 0]
    with pytest.raises(ValueError, match="fraction"):
        removal_counts(Fraction(3, 2), [4])


def test_breakpoints_are_where_the_counts_change():
    assert breakpoints([4, 3]) == [0, Fraction(1, 8), Fraction(1, 6), Fraction(3, 8), Fraction(1, 2), Fraction(5, 8)]
    points = breakpoints([4, 3])
    counts = [removal_counts(f, [4, 3]) for f in points]
    assert counts == [[0, 0], [1, 0], [1, 1], [2, 1], [2, 2], [3, 2]]
    assert all(removal_counts(f - Fraction(1, 1000), [4, 3]) == before for f, before in zip(points[1:], counts))


def test_bisection_picks_the_closest_cost():
    costs = [100, 80, 55, 30, 10]
    fractions = [Fraction(k, 4) for k in range(5)]

    def cost(fraction: Fraction) -> int:
        return costs[fractions.index(fraction)]

    assert bisect_fraction(cost, 60, fractions) == Fraction(2, 4)  # 55 is 5 away, 80 is 20
    assert bisect_fraction(cost, 70, fractions) == Fraction(1, 4)  # 80 is 10 away, 55 is 15
    assert bisect_fraction(cost, 42.5, fractions) == Fraction(3, 4)  # a tie: the lower cost
    assert bisect_fraction(cost, 100, fractions) == 0
    assert bisect_fraction(cost, 5, fractions) == 1
    many = [Fraction(k, 1000) for k in range(1001)]
    seen = []

    def falling(fraction: Fraction) -> float:
        seen.append(fraction)
        return float(1000 * (1 - fraction))

    assert bisect_fraction(falling, 333.3, many) == Fraction(667, 1000)  # cost 333 (0.3 away), not 334
    assert len(set(seen)) <= 14, "bisection, not a scan"


class Tiny(nn.Module):
    """stem 1x1 conv (1->2) - BN - ReLU - conv (2->4, bias) - BN - ReLU - conv (4->3) - ReLU - avg pool - FC (3->2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2)
        self.conv2, self.bn2 = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 3, 1, bias=False)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.stem.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        # L1 norms 3, 1, 4, 2: filter 1 goes first, then filter 3
        model.conv2.weight.copy_(torch.tensor([[2.0, -1.0], [0.5, 0.5], [-4.0, 0.0], [1.0, 1.0]]).view(4, 2, 1, 1))
        model.conv2.weight[2, 1] = 0.0  # one zero weight: MACs count nonzero weights only
        # L1 norms 4, 2, 6: filter 1 goes first
        model.conv3.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, -0.5, 0.5, -0.5], [1.5] * 4]).view(3, 4, 1, 1))
        for norm in (model.bn0, model.bn2):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(0.1, 0.5)
    return model.eval()


def test_tiny_net_by_hand():
    """16 positions per conv. MACs: stem 2 x 16 = 32; conv2 7 nonzero weights x 16 = 112;
    conv3 12 x 16 = 192; FC 6: 342. Breakpoints of (4, 3) filters: 0, 1/8, 1/6, 3/8, ...;
    at 1/8 conv2 loses filter 1 (2 weights, and conv3's column 1): 32 + 80 + 144 + 6 = 262;
    at 1/6 conv3 loses filter 1 too (and FC's column 1): 32 + 80 + 96 + 4 = 212;
    at 3/8 conv2 loses filter 3 as well: 32 + 48 + 64 + 4 = 148."""
    model = tiny()
    assert filter_layers(model, SHAPE) == ["conv2", "conv3"]
    assert summarize(model, SHAPE).macs_sparse == 342
    report = l1_filter_prune(model, 225, SHAPE)  # 212 is 13 away, 262 is 37
    assert report.settings["macs"] == 212 and report.settings["fraction"] == pytest.approx(1 / 6)
    assert summarize(model, SHAPE).macs_sparse == 212
    conv2 = current_mask(model.conv2)
    assert conv2.flatten(1).any(dim=1).tolist() == [True, False, True, True]
    assert not conv2[1].any() and conv2[[0, 2, 3]].all(), "whole filters only"
    assert current_mask(model.conv2, "bias").tolist() == [True, False, True, True]
    for name in ("weight", "bias"):
        assert effective_tensor(model.bn2, name)[1] == 0 and (effective_tensor(model.bn2, name)[[0, 2, 3]] != 0).all()
    conv3 = current_mask(model.conv3).flatten(1)
    assert conv3.tolist() == [[True, False, True, True], [False] * 4, [True, False, True, True]], "column 1 cleared"
    assert current_mask(model.fc).tolist() == [[True, False, True]] * 2
    assert current_mask(model.stem).all() and current_mask(model.bn0).all() and torch.equal(
        effective_tensor(model.stem, "weight"), torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
    ), "the stem is untouched"
    assert [layer.channels_alive for layer in report.layers] == [2, 3, 2, 2]


def test_iterations_prune_further_and_never_revive():
    model = tiny()
    l1_filter_prune(model, 262, SHAPE)
    assert summarize(model, SHAPE).macs_sparse == 262
    first = current_mask(model.conv2).clone()
    with torch.no_grad():  # retraining changes the ranking: filter 0 now weakest of the alive ones
        model.conv2.weight[0] *= 0.01
    report = l1_filter_prune(model, 150, SHAPE)
    assert report.settings["fraction"] == pytest.approx(3 / 8) and report.settings["macs"] == summarize(model, SHAPE).macs_sparse
    alive = current_mask(model.conv2).flatten(1).any(dim=1)
    assert alive.tolist() == [False, False, True, True], "filter 1 stays removed, filter 0 goes next"
    assert not (current_mask(model.conv2) & ~first).any()


def test_masked_equals_compacted():
    model = tiny()
    l1_filter_prune(model, 150, SHAPE)
    x = torch.randn(5, *SHAPE)
    small = nnrelief.compact(model, x)
    compacted = summarize(small, SHAPE)
    assert compacted.macs_sparse == summarize(model, SHAPE).macs_sparse == 148
    assert compacted.macs_dense == 148 + 16, "the dense count also counts conv2's one zero weight (16 positions)"
    assert [layer.weight_shape for layer in compacted.layers] == [(2, 1, 1, 1), (2, 2, 1, 1), (2, 2, 1, 1), (2, 2)]
    assert torch.allclose(small(x), model(x), atol=1e-6)


def test_resnet20_block_internal_convs_only():
    torch.manual_seed(0)
    model = resnet20().eval()
    shape = (3, 32, 32)
    internal = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert filter_layers(model, shape) == internal
    dense = summarize(model, shape)
    report = l1_filter_prune(model, 0.6 * dense.macs_sparse, shape)
    after = summarize(model, shape)
    assert after.macs_sparse == report.settings["macs"]
    assert abs(after.macs_sparse - 0.6 * dense.macs_sparse) < 0.01 * dense.macs_sparse
    fraction = Fraction(report.settings["fraction"]).limit_denominator(1000)
    for layer in after.layers:
        removed = layer.channels_total - layer.channels_alive
        if layer.name in internal:
            assert removed == removal_counts(fraction, [layer.channels_total])[0] > 0, layer.name
            mask = current_mask(model.get_submodule(layer.name))
            assert mask.flatten(1).all(dim=1).sum() == layer.channels_alive, "whole filters only"
        else:
            assert removed == 0, f"{layer.name} writes into the residual stream (or is the stem, or the FC)"
    for name in internal:
        gone = ~current_mask(model.get_submodule(name)).flatten(1).any(dim=1)
        reader = current_mask(model.get_submodule(name.replace("conv1", "conv2"))).flatten(2).any(dim=2)
        assert torch.equal(reader, (~gone).expand_as(reader)), f"the block's second conv no longer reads {name}'s removed channels"
        norm = model.get_submodule(name.replace("conv1", "bn1"))
        assert not effective_tensor(norm, "weight")[gone].any() and not effective_tensor(norm, "bias")[gone].any()
    x = torch.randn(2, *shape)
    small = nnrelief.compact(model, x)
    assert summarize(small, shape).macs_dense == after.macs_sparse
    assert torch.allclose(small(x), model(x), atol=1e-4)


def test_spared_layers_keep_their_filters_and_targets_name_them():
    torch.manual_seed(0)
    model = resnet20().eval()
    shape = (3, 32, 32)
    spared = {"layer1.0.conv1", "layer3.2.conv1"}
    l1_filter_prune(model, 0.7 * summarize(model, shape).macs_sparse, shape, spared)
    alive = {layer.name: layer.channels_total - layer.channels_alive for layer in summarize(model, shape).layers}
    assert all(alive[name] == 0 for name in spared) and alive["layer2.0.conv1"] > 0
    with pytest.raises(ValueError, match="other than the spared"):
        l1_filter_prune(resnet20(), 1e6, shape, set(filter_layers(resnet20(), shape)))
    # What a run's history says: the layers its ignore/only choices spared, from the reports.
    report = {"layers": [{"name": "fc", "weights_kept": 5, "bias_kept": 1}],
              "skipped": {"layer1.0.conv1": SPARED, "head": "never runs in the forward pass"}}  # fmt: skip
    records = [SimpleNamespace(iteration=0, report=None, macs_sparse=10), SimpleNamespace(iteration=1, report=report, macs_sparse=7)]
    targets = Targets.of(SimpleNamespace(records=records), seed=0, input_shape=shape)
    assert targets.spared == {"layer1.0.conv1"} and targets.kept == [{"fc": 6}] and targets.macs == [7]


def test_a_net_without_filter_layers_is_refused():
    with pytest.raises(ValueError, match="LeNet300100 has no conv layer whose filters L1-filter pruning can remove"):
        filter_layers(lenet300_100(), (1, 28, 28))
