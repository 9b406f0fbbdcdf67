"""Parameter counts, MACs, alive channels and the mask/weight check on hand-computed cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import nnrelief
from nnrelief.compaction import compact
from nnrelief.metrics import (
    MaskMismatchError,
    alive_channels,
    check_masks,
    count_parameters,
    file_size,
    layer_macs,
    summarize,
)
from nnrelief.models import get_model
from nnrelief.pruning.masks import make_permanent, set_mask


def _masked_linear() -> nn.Linear:
    """Linear(3, 2), all weights 1 and biases 0.5, masks: weight [[1,0,1],[0,0,0]], bias [1,0]."""
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(0.5)
    set_mask(layer, "weight", torch.tensor([[True, False, True], [False, False, False]]))
    set_mask(layer, "bias", torch.tensor([True, False]))
    return layer


def test_linear_counts_by_hand() -> None:
    layer = _masked_linear()
    counts = count_parameters(layer)
    assert counts == {"layer_total": 8, "layer_nonzero": 3, "all_total": 8, "all_nonzero": 3}
    assert layer_macs(layer, (3,)) == {"": (6, 2)}
    assert alive_channels(layer) == (1, 2)
    summary = summarize(layer, (3,))
    assert (summary.params_total, summary.params_nonzero, summary.macs_dense, summary.macs_sparse) == (8, 3, 6, 2)


def test_linear_on_sequence_input_counts_every_row() -> None:
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))
    assert layer_macs(layer, (5, 3)) == {"": (5 * 6, 5 * 2)}


def test_conv_with_stride_and_padding_by_hand() -> None:
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
    keep = torch.ones_like(conv.weight)
    keep[0] = 0  # filter 0 gone (18 weights)
    keep[1, 1] = 0  # one 3x3 kernel of filter 1 gone (9 weights)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(1.0)
    set_mask(conv, "weight", keep.bool())
    set_mask(conv, "bias", torch.tensor([False, True, True]))
    # 7x7 input, kernel 3, stride 2, pad 1 -> 4x4 output = 16 positions.
    dense = 16 * 3 * 2 * 9
    sparse = 16 * (54 - 18 - 9)
    assert layer_macs(conv, (2, 7, 7)) == {"": (dense, sparse)}
    assert count_parameters(conv)["layer_nonzero"] == 27 + 2
    assert alive_channels(conv) == (2, 3)


def test_all_parameters_include_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))
    with torch.no_grad():
        model[1].bias.zero_()
    counts = count_parameters(model)
    assert (counts["layer_total"], counts["all_total"]) == (2, 2 + 4)
    assert counts["all_nonzero"] == 2 + 2  # conv weights + BN weights (BN biases are 0)


def test_layer_called_twice_is_summed_and_modes_restored() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    model = Twice().train()
    assert layer_macs(model, (4,)) == {"fc": (32, 32)}
    assert model.training


def test_masked_permanent_and_compacted_counts_agree() -> None:
    torch.manual_seed(0)
    model = get_model("lenet5", 10)
    x = torch.randn(8, 1, 28, 28)
    nnrelief.prune(model, [x], alpha_fc=0.8, alpha_conv=0.8, progress=False)
    model.eval()
    masked = summarize(model, (1, 28, 28))
    compacted = summarize(compact(model, x[:2]), (1, 28, 28))
    assert masked.params_nonzero == compacted.params_nonzero
    assert masked.macs_sparse == compacted.macs_sparse
    assert compacted.macs_dense < masked.macs_dense
    assert masked.architecture()["conv1"] <= compacted.architecture()["conv1"] <= 20
    permanent = summarize(make_permanent(model), (1, 28, 28))
    assert permanent.to_dict()["layers"] == masked.to_dict()["layers"]
    table = masked.table()
    assert "conv2" in table and "total" in table


def test_check_masks_passes_after_pruning_and_catches_mismatch() -> None:
    torch.manual_seed(0)
    model = get_model("lenet300_100", 10)
    nnrelief.prune(model, [torch.randn(16, 1, 28, 28)], alpha_fc=0.8, progress=False)
    check_masks(model)
    pruned = (model.fc1.weight_mask == 0).nonzero()[0]
    with torch.no_grad():
        model.fc1.weight[tuple(pruned)] = 0.3  # written around the mask
    with pytest.raises(MaskMismatchError, match="fc1.weight: 1 entries"):
        check_masks(model)


def test_file_size(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 1234)
    assert file_size(path) == 1234
