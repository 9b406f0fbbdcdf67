"""Structure cleaning: dead neurons, backward pruning, BatchNorm zeroing, residual rule."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnrelief
from nnrelief.compaction import compact
from nnrelief.pruning import cleaning
from nnrelief.pruning.cleaning import LayerMask, NonzeroConnections, residual_decisions
from nnrelief.pruning.masks import current_mask, gate_of


def alive_rows(module):
    weight = current_mask(module, "weight").flatten(1).any(1)
    bias = current_mask(module, "bias")
    return weight | bias if bias is not None else weight


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_dead_neuron_is_removed_with_all_its_connections():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[1] = 0.01 * torch.randn(4)
        model.fc1.bias[1] = -10.0  # never active on the pruning set
        model.fc2.bias.fill_(5.0)  # every fc2 neuron active
    nnrelief.prune(model, [torch.randn(32, 4)], alpha_fc=1.0, progress=False)
    assert alive_rows(model.fc1).tolist() == [True, False, True]
    assert not model.fc1.weight[1].any() and model.fc1.bias[1] == 0
    assert not model.fc2.weight[:, 1].any()  # outgoing connections gone too
    assert model.fc2.weight[:, [0, 2]].all()


def test_neuron_without_outgoing_connections_is_removed_backwards():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc3.weight[:, 2] = 0.0  # fc2 neuron 2 feeds nothing
        model.fc2.weight[:, 0] = 0.0  # so fc1 neuron 0 feeds nothing
    nnrelief.prune(model, [torch.randn(32, 4)], alpha_fc=1.0, progress=False)
    assert alive_rows(model.fc2).tolist() == [True, True, False]
    assert alive_rows(model.fc1).tolist() == [False, True, True]
    assert alive_rows(model.fc3).all()  # outputs are never removed


class ConvFlattenFC(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


def test_backward_pruning_chain_through_conv_flatten_fc_and_bn_zeroing():
    torch.manual_seed(0)
    model = ConvFlattenFC()
    with torch.no_grad():
        model.fc.weight.view(5, 4, 9)[:, 2] = 0.0  # conv2 channel 2 feeds no FC input
        model.conv2.weight[:, 1] = 0.0  # conv1 channel 1 feeds no conv2 filter
        model.bn1.bias.fill_(0.1)
        model.bn2.bias.fill_(0.1)
    nnrelief.prune(model, [torch.randn(8, 2, 12, 12)], alpha_fc=1.0, alpha_conv=1.0, progress=False)
    assert alive_rows(model.conv2).tolist() == [True, True, False, True]
    assert alive_rows(model.conv1).tolist() == [True, False, True]
    assert model.bn2.weight[2] == 0 and model.bn2.bias[2] == 0 and model.bn2.bias[0] != 0
    assert model.bn1.weight[1] == 0 and model.bn1.bias[1] == 0
    assert not model.fc.weight.view(5, 4, 9)[:, 2].any()


def test_dead_conv_filter_removes_its_fc_columns():
    torch.manual_seed(0)
    model = ConvFlattenFC()
    with torch.no_grad():
        model.bn2.weight[3] = 0.0
        model.bn2.bias[3] = -1.0  # relu(bn2) channel 3 is always zero
    nnrelief.prune(model, [torch.randn(8, 2, 12, 12)], alpha_fc=1.0, alpha_conv=1.0, progress=False)
    assert alive_rows(model.conv2).tolist() == [True, True, True, False]
    assert not model.fc.weight.view(5, 4, 9)[:, 3].any()
    assert model.bn2.bias[3] == 0


def test_residual_decisions_by_hand():
    branch = torch.zeros(3, 2, 2)
    shortcut = torch.zeros(3, 2, 2)
    branch[0], shortcut[0] = 0.01, 1.0  # weak branch
    branch[1], shortcut[1] = 1.0, 0.01  # weak shortcut
    branch[2], shortcut[2] = 1.0, 1.0
    prune_branch, mask_shortcut = residual_decisions(branch, shortcut, alpha=0.9)  # r = 1/9
    assert prune_branch.tolist() == [True, False, False]
    assert mask_shortcut.tolist() == [False, True, False]
    prune_branch, mask_shortcut = residual_decisions(branch, shortcut, alpha=1.0)
    assert not prune_branch.any() and not mask_shortcut.any()


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_residual_rule_prunes_weak_branch_and_gates_weak_shortcut():
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        model.stem.bias.fill_(1.0)
        model.block.bn2.weight.copy_(torch.tensor([1e-4, 1e3, 1.0, 1.0]))
    x = torch.randn(16, 3, 8, 8)
    nnrelief.prune(model, [x], alpha_fc=1.0, alpha_conv=0.9, progress=False)
    assert not alive_rows(model.block.conv2)[0]  # weak branch filter removed
    assert model.block.bn2.weight[0] == 0 and model.block.bn2.bias[0] == 0
    gate = gate_of(model.block.shortcut)
    assert gate is not None and gate.tolist() == [True, False, True, True]
    # the gate acts in an ordinary forward pass and survives a state_dict round trip
    model.eval()
    fresh = TinyResNet()
    nnrelief.restore_masks(fresh, model.state_dict())
    fresh.eval()
    assert torch.equal(model(x), fresh(x))
    shortcut_out = {}
    model.block.shortcut.register_forward_hook(lambda m, i, o: shortcut_out.setdefault("o", o))
    model(x)
    assert not shortcut_out["o"][:, 1].any() and shortcut_out["o"][:, 0].any()


class ConvBNNoBias(nn.Module):
    """conv (no bias) -> BN -> ReLU, twice, then global pooling and a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _engineered_bn_shift_model(seed):
    """Filters without kernels whose BatchNorm shift is a constant, some positive (alive
    after the ReLU), some negative (dead)."""
    torch.manual_seed(seed)
    model = ConvBNNoBias()
    with torch.no_grad():
        for conv, bn in ((model.conv1, model.bn1), (model.conv2, model.bn2)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 1.0)
            bn.running_mean.normal_(0.0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            conv.weight[:4] = 0.0  # four filters without any kernel
    return model.eval()


def test_bn_shift_counts_as_bias_so_removing_dead_filters_never_changes_outputs():
    for seed in range(5):
        model = _engineered_bn_shift_model(seed)
        constants = [
            bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps) for bn in (model.bn1, model.bn2)
        ]
        x = torch.randn(64, 3, 8, 8)
        with torch.no_grad():
            before = model(x)
        nnrelief.prune(model, [x], alpha_fc=1.0, alpha_conv=1.0, progress=False)  # outputs compared on the pruning set
        with torch.no_grad():
            assert torch.allclose(model(x), before, atol=1e-5), f"seed {seed}"
            # a kernel-less filter survives exactly when relu(its constant) is nonzero
            for bn, constant in zip((model.bn1, model.bn2), constants):
                assert current_mask(bn, "bias")[:4].tolist() == (constant[:4] > 0).tolist()
            small = compact(model, x[:2])
            assert torch.allclose(small(x), before, atol=1e-5)
            assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


class DepthwiseBlock(nn.Module):
    """pointwise expand -> depthwise 3x3 -> pointwise project, no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 6, 1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.project = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.depthwise(F.relu(self.expand(x))))
        return self.fc(self.project(x).mean((2, 3)))


def test_depthwise_channel_dies_with_its_input_channel_and_the_other_way_round():
    torch.manual_seed(0)
    model = DepthwiseBlock()
    with torch.no_grad():
        model.expand.weight[2] = 0.0
        model.expand.bias[2] = 0.0  # expand channel 2 carries nothing
        model.project.weight[:, 4] = 0.0  # depthwise channel 4 feeds nothing
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    nnrelief.prune(model, [x], alpha_fc=1.0, alpha_conv=1.0, progress=False)
    assert alive_rows(model.depthwise).tolist() == [True, True, False, True, False, True]
    assert alive_rows(model.expand).tolist() == [True, True, False, True, False, True]
    assert not model.project.weight[:, [2, 4]].any()
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)
        small = compact(model, x[:2])
        assert small.depthwise.weight.shape == (4, 1, 3, 3) and small.depthwise.groups == 4
        assert torch.allclose(small(x), before, atol=1e-5)


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.grouped(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_grouped_conv_is_pruned_per_group_and_compacts_exactly():
    torch.manual_seed(0)
    model = GroupedConvNet()
    with torch.no_grad():
        model.grouped.weight[4:, 1] = 0.0  # conv1 channel 5 (group 1, slot 1) feeds nothing
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    nnrelief.prune(model, [x], alpha_fc=1.0, alpha_conv=1.0, progress=False)
    assert alive_rows(model.conv1).tolist() == [True] * 5 + [False] + [True] * 2
    assert current_mask(model.grouped, "weight")[:4].all()  # group 0 untouched
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)
        assert torch.allclose(compact(model, x[:2])(x), before, atol=1e-5)


class ShapeBranchMLP(nn.Module):
    """Untraceable by torch.fx (control flow on a shape), captured by torch.export."""

    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 6), nn.Linear(6, 3), act

    def forward(self, x):
        if x.size(0) > 0:
            x = x * 1.0
        return self.fc2(self.act(self.fc1(x)))


def test_export_chains_remove_whole_neurons_only_where_exact():
    for act, zero_preserving in ((nn.GELU(), True), (nn.Sigmoid(), False)):
        torch.manual_seed(0)
        model = ShapeBranchMLP(act)
        with torch.no_grad():
            model.fc1.weight[2] = 0.0
            model.fc1.bias[2] = 0.0  # neuron 2 outputs act(0): 0 for GELU, 0.5 for the sigmoid
            model.fc2.weight[:, 4] = 0.0  # neuron 4 feeds nothing
        x = torch.randn(16, 4)
        with torch.no_grad():
            before = model(x)
        nnrelief.prune(model, [x], alpha_fc=1.0, progress=False)
        assert alive_rows(model.fc1).tolist() == [True, True, False, True, False, True]
        assert bool(model.fc2.weight[:, 2].any()) != zero_preserving  # the sigmoid's 0.5 still counts
        with torch.no_grad():
            assert torch.allclose(model(x), before, atol=1e-6)
            small = compact(model, x[:2])
            assert small.fc1.out_features == small.fc2.in_features == (4 if zero_preserving else 5)
            assert torch.allclose(small(x), before, atol=1e-6)


@pytest.mark.parametrize("block", [7, 64])  # rows of one group at once; whole groups at once
@pytest.mark.parametrize("shape, groups, transposed", [((6, 5), 1, False), ((6, 5), 1, True), ((6, 2, 3, 3), 3, False), ((4, 1, 3), 4, False)])
def test_nonzero_connections_answer_as_a_mask_of_the_nonzero_weights_without_changing_them(monkeypatch, block, shape, groups, transposed):
    monkeypatch.setattr(cleaning, "_BLOCK_ENTRIES", block)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.4)
    weight = weight.t().contiguous().t() if transposed else weight  # laid out as GPT-2's Conv1D stores it
    before = weight.clone()
    bias = torch.randn(shape[0], generator=generator) * (torch.rand(shape[0], generator=generator) < 0.3)
    shift = torch.rand(shape[0], generator=generator) < 0.2
    nonzero = weight != 0
    mask = LayerMask(nonzero.flatten(2).any(dim=2) if weight.dim() > 2 else nonzero, bias != 0, shift.clone(), groups)
    lazy = NonzeroConnections(weight, bias, shift, groups)
    for step in range(8):
        assert torch.equal(lazy.alive(), mask.alive()) and torch.equal(lazy.used_inputs(), mask.used_inputs())
        if step % 2:
            live = torch.rand(shape[1] * groups, generator=generator) < 0.7
            assert lazy.clear_inputs(live) == mask.clear_inputs(live)
        else:
            remove = torch.rand(shape[0], generator=generator) < 0.3
            assert lazy.remove_neurons(remove) == mask.remove_neurons(remove)
    assert torch.equal(weight, before)
