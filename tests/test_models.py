"""Tests for the model zoo ``nnrelief.models``."""

from __future__ import annotations

import math
import operator

import pytest
import torch
from torch import fx, nn

from nnrelief.models import (
    IMAGE_MODELS,
    INPUT_SHAPES,
    MODELS,
    PadShortcut,
    get_model,
    input_shape,
    lenet5,
    lenet300_100,
    mobilenetv2_cifar,
    resnet20,
    resnet_cifar,
    vgg,
    vgg_like,
)

EXPECTED_NAMES = {
    "lenet300_100", "lenet5", "vgg_like", "vgg11", "vgg13", "vgg16", "vgg19",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18_tiny", "mobilenetv2_cifar",
}
HEAVY = {"vgg19", "resnet110", "resnet18_tiny"}


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batch_size(name: str) -> int:
    return 1 if name in HEAVY else 2


def test_registry_names_and_shapes() -> None:
    assert set(MODELS) == EXPECTED_NAMES | {"byte_llama"}
    assert set(INPUT_SHAPES) == set(MODELS)
    assert set(IMAGE_MODELS) == EXPECTED_NAMES
    assert input_shape("byte_llama") == (256,)
    assert input_shape("lenet300_100") == (1, 28, 28)
    assert input_shape("lenet5") == (1, 28, 28)
    assert input_shape("vgg_like") == (3, 32, 32)
    assert input_shape("resnet56") == (3, 32, 32)
    assert input_shape("resnet18_tiny") == (3, 64, 64)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        get_model("resnet21", 10)
    message = str(info.value)
    assert "resnet21" in message
    for name in EXPECTED_NAMES:
        assert name in message
    with pytest.raises(ValueError, match="resnet20"):
        input_shape("nope")


@pytest.mark.parametrize(
    ("builder", "expected"),
    # MobileNetV2: torchvision's mobilenet_v2(num_classes=10) has 2,236,682 too (strides differ only).
    [(lenet300_100, 266_610), (lenet5, 431_080), (resnet20, 269_722), (mobilenetv2_cifar, 2_236_682)],
)
def test_exact_parameter_counts(builder, expected: int) -> None:
    assert n_trainable(builder(num_classes=10)) == expected


def test_parameter_count_grows_with_classes() -> None:
    assert n_trainable(resnet20(num_classes=100)) == 269_722 + 90 * 65
    assert n_trainable(lenet5(num_classes=100)) == 431_080 + 90 * 501


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(name: str, num_classes: int) -> None:
    model = get_model(name, num_classes).eval()
    n = batch_size(name)
    with torch.no_grad():
        out = model(torch.randn(n, *input_shape(name)))
    assert out.shape == (n, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_fx_traceable_and_equivalent(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, 10).eval()
    traced = fx.symbolic_trace(model)
    x = torch.randn(1, *input_shape(name))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


class _PadLeafTracer(fx.Tracer):
    """Tracer that keeps PadShortcut as a single call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, PadShortcut) or super().is_leaf_module(m, module_qualified_name)


def test_resnet_shortcuts_are_submodule_calls() -> None:
    model = resnet20()
    pads = [name for name, m in model.named_modules() if isinstance(m, PadShortcut)]
    assert pads == ["layer2.0.shortcut", "layer3.0.shortcut"]
    assert model.layer2[0].shortcut.pad == 8
    assert model.layer3[0].shortcut.pad == 16
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)

    # With PadShortcut as a leaf, every block's shortcut is one call_module node
    # feeding the residual add.
    graph = _PadLeafTracer().trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target.endswith("shortcut")]
    assert len(calls) == 9
    assert all(any(u.target is operator.add for u in n.users) for n in calls)

    # The default tracer inlines PadShortcut; its ops stay attributed to the submodule.
    traced = fx.symbolic_trace(model)
    pad_nodes = [n for n in traced.graph.nodes if n.target is torch.nn.functional.pad]
    owners = [list(n.meta["nn_module_stack"])[-1] for n in pad_nodes]
    assert owners == ["layer2.0.shortcut", "layer3.0.shortcut"]


def test_resnet18_tiny_projection_shortcuts() -> None:
    model = get_model("resnet18_tiny", 200)
    for stage in ("layer2", "layer3", "layer4"):
        proj = getattr(model, stage)[0].shortcut
        assert isinstance(proj, nn.Sequential)
        assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1)
        assert proj[0].stride == (2, 2)
        assert isinstance(proj[1], nn.BatchNorm2d)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer4[1].shortcut, nn.Identity)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)


def test_pad_shortcut_option_a() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(8)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert (out[:, :8] == 0).all()
    assert (out[:, 24:] == 0).all()
    # The first block of stage 2 adds the padded input to the conv branch.
    block = resnet20().layer2[0].eval()
    with torch.no_grad():
        block.bn2.weight.zero_()  # silence the conv branch: output = relu(shortcut)
        y = block(x)
    torch.testing.assert_close(y, torch.relu(out))


def test_bad_depths_rejected() -> None:
    with pytest.raises(ValueError):
        resnet_cifar(18)
    with pytest.raises(ValueError):
        vgg(12)


def test_vgg_variants() -> None:
    plain = vgg(11, 10, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) == 8
    assert sum(isinstance(m, nn.Conv2d) for m in get_model("vgg19", 10).modules()) == 16
    like = vgg_like(10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in like.modules()) == 13
    assert [m.out_features for m in like.classifier if isinstance(m, nn.Linear)] == [512, 512, 10]
    assert sum(isinstance(m, nn.Dropout) for m in like.classifier) == 2


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES - HEAVY))
def test_init_biases_and_batchnorm(name: str) -> None:
    for module in get_model(name, 10).modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            assert (module.bias == 0).all()
        if isinstance(module, nn.BatchNorm2d):
            assert (module.weight == 1).all()
            assert (module.bias == 0).all()


def test_init_kaiming_fan_in_std() -> None:
    torch.manual_seed(0)
    fc1 = lenet300_100().fc1  # 300 x 784 weights
    assert fc1.weight.mean().abs() < 1e-3
    assert math.isclose(fc1.weight.std().item(), math.sqrt(2 / 784), rel_tol=0.02)
    conv = vgg_like().features[-4]  # last 512 -> 512 3x3 conv, fan_in 4608
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 512
    assert math.isclose(conv.weight.std().item(), math.sqrt(2 / 4608), rel_tol=0.02)
    conv_res = resnet20().layer3[1].conv1  # fan_in 64 * 9
    assert math.isclose(conv_res.weight.std().item(), math.sqrt(2 / 576), rel_tol=0.05)
