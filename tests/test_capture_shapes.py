"""A pass whose batches are known to share one shape captures for exactly that shape (a
static export, cheaper); batches of several sizes, or a stream of unknown ones, get a capture
with a dynamic batch. The masks are the same either way."""

from __future__ import annotations

import copy

import pytest
import torch

import nnrelief
from nnrelief.analysis import analyse
from nnrelief.data import BatchLoader
from nnrelief.data.dataset import TensorDataset
from nnrelief.inputs import ModelInput
from nnrelief.models import get_model, input_shape


def _masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("_mask")}


def _dynamic(model: torch.nn.Module, batch: torch.Tensor) -> bool:
    graph = analyse(model, ModelInput((batch,)))
    assert graph.capture is not None
    return graph.capture.dynamic_batch


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_static_capture_for_one_shape_gives_the_same_masks(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, 10).eval()
    batches = list(torch.randn(24, *input_shape(name)).split(8))
    static, dynamic = copy.deepcopy(model), copy.deepcopy(model)
    for _ in range(2):
        nnrelief.prune(static, batches, alpha_fc=0.8, alpha_conv=0.8, progress=False)
        nnrelief.prune(dynamic, iter(batches), alpha_fc=0.8, alpha_conv=0.8, progress=False)  # sizes unknown beforehand
    assert not _dynamic(static, batches[0]) and _dynamic(dynamic, batches[0])
    expected, actual = _masks(dynamic), _masks(static)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_batches_of_several_sizes_get_a_dynamic_capture() -> None:
    torch.manual_seed(0)
    model = get_model("lenet300_100", 10).eval()
    batches = list(torch.randn(20, *input_shape("lenet300_100")).split(8))  # 8, 8, 4
    nnrelief.prune(model, batches, alpha_fc=0.8, progress=False)
    assert _dynamic(model, batches[0])


def test_a_loader_of_equal_batches_says_so() -> None:
    images = torch.randint(0, 255, (30, 1, 28, 28), dtype=torch.uint8)
    dataset = TensorDataset(images, torch.zeros(30, dtype=torch.long), num_classes=10, name="mnist")
    assert BatchLoader(dataset, 10, shuffle=False, seed=0).same_size
    assert not BatchLoader(dataset, 12, shuffle=False, seed=0).same_size
    assert BatchLoader(dataset, 12, shuffle=False, seed=0, drop_last=True).same_size
