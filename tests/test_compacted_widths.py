"""The report's channel counts say what compaction removes: each layer's ``channels_compacted``
is the output width of that layer in the compacted model (a residual stage keeps a channel
while any of its layers carries it), whether compaction narrows in place or needs index maps;
unknown (None) where the model has no capture."""

from __future__ import annotations

import pytest
import torch

import nnrelief
from nnrelief.analysis.layers import weight_matrix
from test_follow_masks import CASES, _built


@pytest.mark.parametrize(
    "case",
    ["resnet18_tiny (identity and projection shortcuts)", "resnet20 (padding shortcuts)", "hf resnet", "llama (gated MLP)", "vgg_like"],
)
def test_compacted_channels_are_the_compacted_widths(case: str) -> None:
    build, batches = CASES[case]()
    model = _built(build)
    for alpha_conv in (0.9, 0.8):
        report = nnrelief.prune(model, batches, alpha_fc=0.9, alpha_conv=alpha_conv, progress=False)
    example = batches[0] if not isinstance(batches[0], torch.Tensor) else batches[0][:2]
    small = dict(nnrelief.compact(model, example).named_modules())
    widths = {layer.name: layer.channels_compacted for layer in report.layers}
    assert widths == {layer.name: weight_matrix(small[layer.name]).shape[0] for layer in report.layers}
    assert all(layer.channels_alive <= layer.channels_compacted <= layer.channels_total for layer in report.layers)


def test_residual_stages_keep_more_channels_than_a_single_layer_uses() -> None:
    build, batches = CASES["resnet18_tiny (identity and projection shortcuts)"]()
    report = nnrelief.prune(_built(build), batches, alpha_fc=0.9, alpha_conv=0.8, progress=False)
    assert any(layer.channels_compacted > layer.channels_alive for layer in report.layers)
    assert "compacted: those compaction keeps" in report.table()


class _DataDependent(torch.nn.Module):
    """A forward torch.export cannot capture (control flow on a tensor's values)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.fc1(x))
        return self.fc2(hidden if hidden.sum() > 0 else -hidden)


def test_unknown_without_a_capture() -> None:
    torch.manual_seed(0)
    report = nnrelief.prune(_DataDependent(), [torch.randn(16, 6)], alpha_fc=0.8, progress=False)
    assert report.layers and all(layer.channels_compacted is None for layer in report.layers)
