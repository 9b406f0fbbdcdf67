"""nnrelief.prune's ignore=, only=, alphas= and target= (layer choice, per-layer alpha, a target size)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nnrelief
from nnrelief.models import INPUT_SHAPES, MODELS
from nnrelief.pruning.choices import alpha_for, find_alpha, spared_layers
from nnrelief.pruning.masks import current_mask, state_with_masks

ZOO = ["lenet300_100", "lenet5", "vgg_like", "resnet20"]


def _model_and_batches(name: str) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    x = torch.rand(24, *INPUT_SHAPES[name], generator=torch.Generator().manual_seed(1))
    return MODELS[name](num_classes=10), [x[:12], x[12:]]


def test_spared_layers_by_pattern_and_type() -> None:
    layers = {"features.0": nn.Conv2d(3, 4, 3), "features.3": nn.Conv2d(4, 4, 3), "classifier": nn.Linear(4, 2)}
    assert spared_layers(layers, ["features.0", nn.Linear], []) == {"features.0", "classifier"}
    assert spared_layers(layers, [], ["features.*"]) == {"classifier"}
    assert alpha_for("classifier", "linear", {"class*": 0.99, "*": 0.5}, 0.9, 0.8) == 0.99
    assert alpha_for("features.3", "conv", {"class*": 0.99}, 0.9, 0.8) == 0.8


def test_find_alpha_bisects_a_monotone_curve() -> None:
    assert find_alpha(lambda alpha: alpha**2, 0.25) == pytest.approx(0.5, abs=1e-6)
    assert find_alpha(lambda alpha: 0.4, 0.9) == 1.0  # unreachable: keep the most


def test_a_spared_layer_keeps_every_weight_and_its_producers_channels() -> None:
    model, batches = _model_and_batches("lenet5")
    report = nnrelief.prune(model, batches, alpha_fc=0.7, alpha_conv=0.7, ignore=["conv1", nn.Linear], progress=False)
    for name in ("conv1", "fc1", "fc2"):
        assert "spared" in report.skipped[name]
        assert current_mask(model.get_submodule(name), "weight").all()
    assert [layer.name for layer in report.layers] == ["conv2"]
    assert report.layers[0].weights_kept < report.layers[0].weights_total
    only = nnrelief.prune(*_model_and_batches("lenet5"), alpha_fc=0.7, only="fc*", progress=False)
    assert {layer.name for layer in only.layers} == {"fc1", "fc2"}


def test_per_layer_alphas() -> None:
    low, batches = _model_and_batches("lenet300_100")
    high = MODELS["lenet300_100"](num_classes=10)
    high.load_state_dict(low.state_dict())
    a = nnrelief.prune(low, batches, alpha_fc=0.8, progress=False)
    b = nnrelief.prune(high, batches, alpha_fc=0.8, alphas={"fc1": 0.99}, progress=False)
    kept = lambda report, name: next(layer.weights_kept for layer in report.layers if layer.name == name)  # noqa: E731
    assert kept(b, "fc1") > kept(a, "fc1") and b.settings["alphas"] == {"fc1": 0.99}


@pytest.mark.parametrize("name", ZOO)
def test_target_lands_near_the_fraction_and_its_alpha_reproduces_the_masks(name: str) -> None:
    model, batches = _model_and_batches(name)
    twin = MODELS[name](num_classes=10)
    twin.load_state_dict(model.state_dict())
    report = nnrelief.prune(model, batches, target=0.3, progress=False)
    assert report.remaining_fraction == pytest.approx(0.3, abs=0.01)
    alpha = report.settings["alpha"]
    again = nnrelief.prune(twin, batches, alpha_fc=alpha, alpha_conv=alpha, progress=False)
    assert again.kept == report.kept
    masks = {k: v for k, v in state_with_masks(model).items() if k.endswith("_mask")}
    assert all(torch.equal(v, state_with_masks(twin)[k]) for k, v in masks.items())


def test_bad_choices_are_refused_before_anything_changes() -> None:
    model, batches = _model_and_batches("lenet300_100")
    with pytest.raises(ValueError, match="target"):
        nnrelief.prune(model, batches, target=1.5)
    with pytest.raises(ValueError, match=r"alphas\['fc1'\]"):
        nnrelief.prune(model, batches, alphas={"fc1": 0})
    with pytest.raises(TypeError, match="ignore takes"):
        nnrelief.prune(model, batches, ignore=[3])
    with pytest.raises(ValueError, match="spare every layer"):
        nnrelief.prune(model, batches, ignore="*")
    assert not any(key.endswith("_mask") for key in state_with_masks(model))
