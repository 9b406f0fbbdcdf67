"""Baseline pruning methods used by `nnrelief compare` and their registry."""

import pytest
import torch
import torch.nn as nn

from nnrelief.experiments import compare, methods
from nnrelief.experiments.baselines import global_magnitude_prune, magnitude_prune, random_prune
from nnrelief.experiments.config import ConfigError
from nnrelief.experiments.methods import METHODS, Targets, get_method
from nnrelief.pruning.masks import current_mask


def two_layers():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -5.0, 2.0], [0.5, 3.0, -4.0]]))
        model[0].bias.copy_(torch.tensor([6.0, -0.1]))
        model[2].weight.copy_(torch.tensor([[0.2, -0.3], [0.4, 0.1]]))
    return model


def test_layerwise_magnitude_by_hand():
    model = two_layers()
    report = magnitude_prune(model, {"0": 3, "2": 2})
    assert current_mask(model[0]).tolist() == [[False, True, False], [False, False, True]]
    assert current_mask(model[0], "bias").tolist() == [True, False]
    assert current_mask(model[2]).tolist() == [[False, True], [True, False]]
    assert [layer.kept for layer in report.layers] == [3, 2]


def test_global_magnitude_by_hand():
    model = two_layers()
    report = global_magnitude_prune(model, 4)
    assert report.kept == 4  # 6, -5, -4, 3 are the four largest over both layers
    assert current_mask(model[0]).tolist() == [[False, True, False], [False, True, True]]
    assert not current_mask(model[2]).any()


def test_random_counts_and_no_revival():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 5))
    generator = torch.Generator().manual_seed(0)
    random_prune(model, {"0": 100, "2": 30}, generator)
    first = current_mask(model[0]).clone()
    report = random_prune(model, {"0": 50, "2": 30}, generator)
    assert [layer.kept for layer in report.layers] == [50, 30]
    assert not (current_mask(model[0]) & ~first).any()
    assert not model[0].weight[~current_mask(model[0])].any()


def test_the_method_list_shown_is_the_registry():
    for module in (methods, compare):
        shown = [line.split("``")[1] for line in module.__doc__.splitlines() if line.startswith("* ``")]
        assert shown == list(METHODS), module.__name__


def test_registry_steps_follow_the_targets():
    assert next(iter(METHODS)) == "nnrelief" and all(name == method.name for name, method in METHODS.items())
    with pytest.raises(ConfigError, match=f"unknown method 'prune-all'; known: {', '.join(METHODS)}$"):
        get_method("prune-all")
    targets = Targets(kept=[{"0": 3, "2": 2}, {"0": 2, "2": 1}], macs=[5, 3], seed=0, input_shape=(3,))
    with pytest.raises(ValueError, match="reference"):
        get_method("nnrelief").step(targets, lambda _k: [])
    model = two_layers()
    step = get_method("magnitude").step(targets, lambda _k: [])
    assert [layer.kept for layer in step(model, 1).layers] == [3, 2]
    assert [layer.kept for layer in step(model, 2).layers] == [2, 1]
    assert get_method("global-magnitude").step(targets, lambda _k: [])(two_layers(), 2).kept == 3
