"""A pass that adds masks and gates writes them into the model's capture (analysis.follow)
instead of exporting again: one export for every pass, and the next pass gives exactly the
masks a fresh capture of the masked model gives."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn

import nnrelief
import nnrelief.analysis
from nnrelief.models import INPUT_SHAPES, MODELS
from nnrelief.pruning.masks import restore_masks, state_with_masks

transformers = pytest.importorskip("transformers")
analysis = sys.modules["nnrelief.analysis"]  # the package (its attribute "capture" is the function)


def _plant_dead_channels(model: nn.Module) -> None:
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.BatchNorm2d):
                quarter = max(1, norm.num_features // 4)
                norm.weight[1 : 1 + quarter] = 0.0
                norm.bias[1 : 1 + quarter] = 0.0


def _zoo(name: str) -> tuple[Callable[[], nn.Module], list[Any]]:
    x = torch.rand(16, *INPUT_SHAPES[name], generator=torch.Generator().manual_seed(1))
    return lambda: MODELS[name](num_classes=10), [x[:8], x[8:]]


def _hf_resnet() -> tuple[Callable[[], nn.Module], list[Any]]:
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[2, 1], layer_type="basic", num_labels=3,
    )  # fmt: skip
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return lambda: transformers.ResNetForImageClassification(config), [{"pixel_values": x}]


def _llama() -> tuple[Callable[[], nn.Module], list[Any]]:
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    ids = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(1))
    return lambda: transformers.LlamaForCausalLM(config), [{"input_ids": ids}]


CASES = {
    "resnet20 (padding shortcuts)": lambda: _zoo("resnet20"),
    "resnet18_tiny (identity and projection shortcuts)": lambda: _zoo("resnet18_tiny"),
    "vgg_like": lambda: _zoo("vgg_like"),
    "hf resnet": _hf_resnet,
    "llama (gated MLP)": _llama,
}


def _built(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = build().eval()
    _plant_dead_channels(model)
    return model


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.bool() for k, v in state_with_masks(model).items() if k.endswith("_mask") or k.endswith("nnrelief_gate")}


def _count_captures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    capture = analysis.capture
    monkeypatch.setattr(analysis, "capture", lambda *a, **k: calls.append(1) or capture(*a, **k))
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_later_passes_follow_the_capture_and_match_a_fresh_one(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    build, batches = CASES[case]()
    exports = _count_captures(monkeypatch)
    followed = _built(build)
    first = nnrelief.prune(followed, batches, alpha_fc=0.9, alpha_conv=0.8, progress=False)
    fresh = _built(build)
    restore_masks(fresh, state_with_masks(followed))  # the same masked model, never captured
    nnrelief.prune(followed, batches, alpha_fc=0.9, alpha_conv=0.8, progress=False)
    assert len(exports) == 1, "the second pass exported the model again"
    nnrelief.prune(fresh, batches, alpha_fc=0.9, alpha_conv=0.8, progress=False)
    assert first.analysis == "channel graph"
    mine, theirs = _masks(followed), _masks(fresh)
    assert mine.keys() == theirs.keys()
    changed = [key for key in mine if not torch.equal(mine[key], theirs[key])]
    assert not changed, f"masks differ from a fresh capture's: {changed[:5]}"
    assert any(not mask.all() for mask in mine.values())


def test_a_change_it_cannot_follow_is_captured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(5, 6)
    nnrelief.prune(model, [x], progress=False)
    model[1] = nn.Tanh()  # a module replaced: not a mask
    exports = _count_captures(monkeypatch)
    nnrelief.prune(model, [x], progress=False)
    assert len(exports) == 1
