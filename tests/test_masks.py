"""Masks hold under training, survive save/load, become permanent, never revive."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnrelief
from nnrelief.models import lenet5, lenet300_100, resnet20
from nnrelief.pruning.masks import StateDictMismatchError, current_mask, state_with_masks


def pruned_lenet5(seed=0):
    torch.manual_seed(seed)
    model = lenet5()
    nnrelief.prune(model, [torch.rand(64, 1, 28, 28)], alpha_fc=0.8, alpha_conv=0.8, progress=False)
    return model


def masked_entries_are_zero(model):
    for module in model.modules():
        for name in ("weight", "bias"):
            if hasattr(module, f"{name}_mask"):
                mask = getattr(module, f"{name}_mask").bool()
                if getattr(module, name)[~mask].any():
                    return False
    return True


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=5e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-momentum-wd", "adam", "adamw"],
)
def test_masks_hold_under_optimizer_steps(make_optimizer):
    model = pruned_lenet5()
    model.train()
    optimizer = make_optimizer(model.parameters())
    for _ in range(5):
        x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model(torch.rand(2, 1, 28, 28))  # recompute effective weights
    assert masked_entries_are_zero(model)
    assert sum(int((~m.weight_mask.bool()).sum()) for m in model.modules() if hasattr(m, "weight_mask")) > 0


def test_state_dict_round_trip_into_fresh_model():
    model = pruned_lenet5()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = lenet5()
    nnrelief.restore_masks(fresh, torch.load(buffer, weights_only=True))
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model.eval()(x), fresh.eval()(x))
    for (name, a), (_, b) in zip(model.named_modules(), fresh.named_modules()):
        if isinstance(a, (nn.Linear, nn.Conv2d)):
            assert torch.equal(current_mask(a), current_mask(b)), name
    assert masked_entries_are_zero(fresh)


def test_round_trip_with_gates_on_resnet():
    torch.manual_seed(0)
    model = resnet20()
    with torch.no_grad():
        model.layer1[0].bn2.weight[:4] = 1e3
    nnrelief.prune(model, [torch.randn(16, 3, 32, 32)], progress=False)
    assert any(hasattr(m, "nnrelief_gate") for m in model.modules())
    fresh = resnet20()
    nnrelief.restore_masks(fresh, model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), fresh.eval()(x))


def test_restore_into_another_architecture_changes_nothing_and_keeps_every_difference():
    state = state_with_masks(pruned_lenet5())
    other = lenet300_100()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match="model left unchanged") as info:
        nnrelief.restore_masks(other, state)
    error = info.value
    assert "fc1.weight: checkpoint (500, 800), model (300, 784)" in error.shapes
    assert "conv2.weight_mask" in error.unexpected and "fc3.bias" in error.missing
    assert len(str(error).splitlines()) == 1 + len(error.details) <= 4  # the first few keys of each kind, not all
    assert f"{len(error.unexpected)} keys not in the model" in error.headline and "conv1.weight" in error.details[-1]
    assert not any(hasattr(m, "weight_mask") or m._forward_pre_hooks for m in other.modules())
    assert before.keys() == other.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_make_permanent_leaves_plain_parameters():
    model = pruned_lenet5().eval()
    x = torch.rand(4, 1, 28, 28)
    before = model(x)
    nnrelief.make_permanent(model)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers()) and not state_with_masks(model).keys() - model.state_dict().keys()
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert isinstance(model.conv2.weight, nn.Parameter)
    assert torch.allclose(model(x), before)
    clean = lenet5()
    clean.load_state_dict(model.state_dict())  # an ordinary load works now
    assert (clean.conv2.weight == 0).any()


def test_second_pass_only_removes():
    model = pruned_lenet5()
    first = {n: current_mask(m).clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    # a weight that the first pass removed must stay removed even if something writes it
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    nnrelief.prune(model, [torch.rand(64, 1, 28, 28)], alpha_fc=0.99, alpha_conv=0.99, progress=False)
    for name, mask in first.items():
        after = current_mask(dict(model.named_modules())[name])
        assert not (after & ~mask).any(), name
        assert after.sum() <= mask.sum()


def test_mode_and_requires_grad_are_restored():
    model = lenet5()
    model.train()
    model.conv1.weight.requires_grad_(False)
    model.fc2.eval()
    nnrelief.prune(model, [torch.rand(8, 1, 28, 28)], progress=False)
    assert model.training and model.conv1.training and not model.fc2.training
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad


def test_restore_masks_refuses_what_is_not_a_binary_state_dict():
    import nnrelief
    from nnrelief.models import lenet300_100

    torch.manual_seed(0)
    pruned = lenet300_100()
    nnrelief.prune(pruned, [torch.rand(8, 784)], alpha_fc=0.8, progress=False)
    with pytest.raises(TypeError, match="needs a state dict"):
        nnrelief.restore_masks(lenet300_100(), [1, 2])
    for bad in (0.5, float("nan")):
        state = {key: value.clone() for key, value in state_with_masks(pruned).items()}
        state["fc1.weight_mask"] = state["fc1.weight_mask"].float()  # a foreign file's float mask
        state["fc1.weight_mask"][0, 0] = bad
        fresh = lenet300_100()
        before = {key: value.clone() for key, value in fresh.state_dict().items()}
        with pytest.raises(ValueError, match="fc1.weight_mask"):
            nnrelief.restore_masks(fresh, state)
        assert fresh.state_dict().keys() == before.keys()
        assert all(torch.equal(fresh.state_dict()[key], value) for key, value in before.items())
