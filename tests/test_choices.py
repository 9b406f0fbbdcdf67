"""nnrelief.prune's ignore=, only=, alphas= and target= (layer choice, per-layer alpha, a target size)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import nnrelief
from nnrelief.experiments import iterative
from nnrelief.models import INPUT_SHAPES, MODELS
from nnrelief.pruning.choices import UnreachableTargetError, alpha_for, find_alpha, spared_layers
from nnrelief.pruning.masks import current_mask, state_with_masks
from nnrelief.pruning.pass_settings import PassSettings

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


class _Toy(nn.Module):
    """A model with the layer names and types of README's examples (conv1, an Embedding,
    *.mlp.* layers, a classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.position = nn.Embedding(1, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))})
                                    for _ in range(2))  # fmt: skip
        self.classifier = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x)).mean(dim=(2, 3)) + self.position.weight[0]
        for block in self.blocks:
            h = h + block["mlp"](h)
        return self.classifier(h)


def _readme_choice_lines() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith(("nnrelief.prune(model, batches,", "report = nnrelief.prune(model, batches,"))]


def test_readme_choice_examples_run() -> None:
    lines = _readme_choice_lines()
    assert len(lines) >= 4
    for line in lines:  # each on a fresh model: they are alternatives
        torch.manual_seed(0)
        namespace = {"nnrelief": nnrelief, "nn": nn, "model": _Toy(), "batches": [torch.rand(16, 3, 8, 8)]}
        exec(line[:-1] + ", progress=False)" if line.endswith(")") else line, namespace)


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        ({"ignore": ["nope*"]}, "ignore=: pattern 'nope\\*' matches no prunable layer of LeNet300100 \\(fc1, fc2, fc3\\)"),
        ({"alphas": {"nope": 0.5}}, "alphas=: pattern 'nope' matches no prunable layer"),
        ({"ignore": [nn.Embedding]}, "ignore=: LeNet300100 has no module of type Embedding"),
        ({"only": ["fc1", "fc_2"]}, "only=: pattern 'fc_2' matches no prunable layer"),
        ({"alphas": {"fc1": None}}, "alphas\\['fc1'\\] must be a number in \\(0, 1\\], got None"),
    ],
)
def test_a_choice_that_matches_nothing_is_named_and_the_model_left_alone(choices, message) -> None:
    model, batches = _model_and_batches("lenet300_100")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        nnrelief.prune(model, batches, progress=False, **choices)
    assert model.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_unreachable_target_is_refused_and_the_model_left_alone() -> None:
    model, batches = _model_and_batches("lenet300_100")
    first = nnrelief.prune(model, batches, target=0.25, progress=False)
    masks = {k: v.clone() for k, v in state_with_masks(model).items() if k.endswith("_mask")}
    with pytest.raises(UnreachableTargetError, match=f"already keep only {first.remaining_fraction:.4g}") as caught:
        nnrelief.prune(model, batches, target=0.9, progress=False)
    assert caught.value.remaining == pytest.approx(first.remaining_fraction)
    assert masks and all(torch.equal(v, state_with_masks(model)[k]) for k, v in masks.items())
    assert nnrelief.prune(model, batches, target=0.1, progress=False).remaining_fraction == pytest.approx(0.1, abs=0.01)


def test_a_run_whose_earlier_pass_went_below_the_next_target_goes_on(monkeypatch) -> None:
    calls = []

    def prune(_model, _batches, **kwargs):
        calls.append(kwargs["target"])
        if len(calls) == 1:
            raise UnreachableTargetError(kwargs["target"], 0.2)
        return "report"

    monkeypatch.setattr(iterative, "prune", prune)
    step = iterative._nnrelief_step([torch.zeros(1)], PassSettings(alpha_fc=0.9, alpha_conv=0.9, target=0.5), False)
    assert step(nn.Linear(1, 1), 2) == "report" and calls == [0.25, 0.2]


def test_a_bare_tensor_as_batches_is_refused_with_the_fix() -> None:
    model, batches = _model_and_batches("lenet5")
    with pytest.raises(TypeError, match=r"one tensor of shape \(12, 1, 28, 28\).*\[x\].*x.split\(n\)"):
        nnrelief.prune(model, batches[0], progress=False)
    assert not any(key.endswith("_mask") for key in state_with_masks(model))


def test_a_batch_of_the_wrong_shape_logs_nothing_before_the_error(capfd) -> None:
    model, _ = _model_and_batches("lenet5")
    for batches in ([torch.rand(8, 1, 28, 28)[0]], [torch.rand(8, 1, 32, 32)]):  # one sample without its batch dim; too large
        with pytest.raises(ValueError, match="the model rejected a pruning batch of shape"):
            nnrelief.prune(model, batches, progress=False)
    assert capfd.readouterr().err == ""
