"""Linear layers written out as ``x @ self.weight.T + self.bias`` (Falcon's FalconLinear, many
hand-written layers) are calls of those layers in the channel graph: scored like nn.Linear,
cleaned and compacted; other uses of a Linear's weight, and weights computed by a
parametrization or a hook, stay conservative (not scored, listed with the reason)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

import nnrelief
from nnrelief.analysis import analyse
from nnrelief.compaction import compact
from nnrelief.inputs import ModelInput
from nnrelief.pruning.masks import current_mask


class MatmulLinear(nn.Linear):
    """nn.Linear computed by hand (``transpose`` picks how the weight is transposed)."""

    def __init__(self, *args, transpose: str = "T", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.transpose = transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transpose == "mm":  # flattened to 2-D, multiplied, reshaped back
            out = torch.mm(x.reshape(-1, x.shape[-1]), self.weight.t()).reshape(*x.shape[:-1], -1)
        else:
            weight = {"T": lambda w: w.T, "t": lambda w: w.t(), "transpose": lambda w: w.transpose(-1, -2),
                      "permute": lambda w: w.permute(1, 0)}[self.transpose](self.weight)  # fmt: skip
            out = torch.matmul(x, weight)
        return out if self.bias is None else out + self.bias


class Mlp(nn.Module):
    def __init__(self, linear: type[nn.Linear] = nn.Linear, **kwargs) -> None:
        super().__init__()
        self.fc1 = linear(12, 24, **kwargs)
        self.act = nn.ReLU()
        self.fc2 = linear(24, 16, **kwargs)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(32, 5, 12, generator=generator) for _ in range(2)]


def _planted(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # fc1 neurons 0..3 feed nothing: backward cleaning removes them
        model.fc2.weight[:, :4] = 0.0
    return model


@pytest.mark.parametrize("transpose", ["T", "t", "transpose", "permute", "mm"])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul_linear_masks_equal_nn_linear_masks(transpose: str, bias: bool) -> None:
    torch.manual_seed(0)
    reference = _planted(Mlp(bias=bias))
    written = Mlp(MatmulLinear, bias=bias, transpose=transpose)
    written.load_state_dict(reference.state_dict())
    for _ in range(2):
        expected = nnrelief.prune(reference, _batches(), alpha_fc=0.9, progress=False)
        got = nnrelief.prune(written, _batches(), alpha_fc=0.9, progress=False)
    assert got.kept == expected.kept < expected.total
    for name in ("fc1", "fc2", "head"):
        for parameter in ("weight", "bias") if bias else ("weight",):
            mask = current_mask(getattr(written, name), parameter)
            assert torch.equal(mask, current_mask(getattr(reference, name), parameter)), (name, parameter)
    assert not current_mask(written.fc1, "weight")[:4].any()


def test_matmul_linear_compacts_in_the_users_class() -> None:
    torch.manual_seed(0)
    model = _planted(Mlp(MatmulLinear))
    nnrelief.prune(model, _batches(), alpha_fc=0.9, progress=False)
    small = compact(model, _batches()[0])
    assert isinstance(small, Mlp) and isinstance(small.fc1, MatmulLinear)
    assert small.fc1.out_features <= 20 and small.fc2.in_features == small.fc1.out_features
    x = torch.randn(7, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-6)


class Untransposed(nn.Linear):
    """Reads its (square) weight untransposed: not the Linear's map, so not scored as one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class BiasElsewhere(nn.Linear):
    """Adds its bias after another operation: not recognised as a plain Linear call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * (x @ self.weight.T) + self.bias


@pytest.mark.parametrize("layer", [Untransposed, BiasElsewhere])
def test_other_uses_of_a_linear_weight_are_skipped_with_a_reason(layer: type[nn.Linear]) -> None:
    model = Mlp()
    model.fc2 = layer(24, 24)
    model.head = nn.Linear(24, 3)
    graph = analyse(model, ModelInput((_batches()[0],)))
    assert "fc2" not in graph.layers and "not a plain call of the layer" in graph.skipped["fc2"]
    before = copy.deepcopy(model.fc2.weight)
    report = nnrelief.prune(model, _batches(), alpha_fc=0.9, progress=False)
    assert "fc2" in report.skipped
    assert torch.equal(model.fc2.weight, before)  # left whole
    assert current_mask(model.fc1, "weight") is not None  # the layers around it are pruned


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "legacy_weight_norm"])
def test_layers_with_computed_weights_are_skipped_with_a_reason(wrap: str) -> None:
    torch.manual_seed(0)
    model = Mlp()
    wrapped = {"weight_norm": nn.utils.parametrizations.weight_norm, "spectral_norm": nn.utils.parametrizations.spectral_norm,
               "legacy_weight_norm": nn.utils.weight_norm}[wrap]  # fmt: skip
    with pytest.warns(FutureWarning) if wrap.startswith("legacy") else contextlib.nullcontext():
        model.fc2 = wrapped(nn.Linear(24, 16))
    model.eval()
    report = nnrelief.prune(model, _batches(), alpha_fc=0.9, progress=False)
    reason = report.skipped["fc2"]
    assert ("parametrization" in reason) != wrap.startswith("legacy") and "left whole" in reason
    assert current_mask(model.fc1, "weight") is not None and current_mask(model.head, "weight") is not None
    x = torch.randn(4, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(compact(model, _batches()[0])(x), model(x), rtol=1e-4, atol=1e-6)
