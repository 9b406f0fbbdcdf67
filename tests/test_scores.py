"""Scores against hand-computed values and a slow loop written from the formula."""

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nnrelief import scores
from nnrelief.analysis import analyse, input_key
from nnrelief.inputs import ModelInput
from nnrelief.pruning.stats import collect


def test_linear_scores_by_hand():
    weight = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    bias = torch.tensor([1.0, -1.0])
    x = torch.tensor([[1.0, 2.0], [-3.0, 0.0]])
    total, count = scores.linear_abs_input_sum(x)
    assert count == 2 and torch.equal(total, torch.tensor([4.0, 2.0]))
    contrib = scores.linear_contributions(weight, total / count)  # mean |x| = [2, 1]
    assert torch.equal(contrib, torch.tensor([[2.0, 2.0], [0.0, 3.0]]))
    s, s_bias = scores.relative_scores(contrib, scores.bias_term(bias))
    assert torch.allclose(s, torch.tensor([[0.4, 0.4], [0.0, 0.75]]))
    assert torch.allclose(s_bias, torch.tensor([0.2, 0.25]))


def test_relative_scores_zero_total_gives_zero():
    s, s_bias = scores.relative_scores(torch.zeros(2, 3), torch.zeros(2))
    assert torch.equal(s, torch.zeros(2, 3)) and torch.equal(s_bias, torch.zeros(2))


def test_conv_norm_by_hand():
    # 3x3 input of ones, 2x2 kernel of ones: each of the 2x2 outputs is 4, norm sqrt(4 * 16) = 8.
    conv = nn.Conv2d(1, 1, 2, bias=False)
    x = torch.stack([torch.ones(1, 3, 3), 2 * torch.ones(1, 3, 3)])
    norms = scores.conv_norm_sum(x, torch.ones(1, 1, 2, 2), conv)
    assert torch.allclose(norms.float(), torch.tensor([[8.0 + 16.0]]))
    assert scores.conv_output_positions((3, 3), conv) == 4
    # conv bias share: |b| * sqrt(h1 h2)
    assert torch.allclose(scores.bias_term(torch.tensor([-0.5]), 4), torch.tensor([1.0]))


def _slow_norm_sum(x, weight, conv):
    """The paper's a_ij * N straight from the formula: one single-channel conv per (n, j, i).

    With groups, filter j reads input channels j's group * C/g + i for i < C/g."""
    filters, channels = weight.shape[:2]
    per_group = filters // conv.groups
    total = torch.zeros(filters, channels, dtype=torch.float64)
    padded = F.pad(x, conv._reversed_padding_repeated_twice) if any(conv._reversed_padding_repeated_twice) else x
    for n in range(x.shape[0]):
        for j in range(filters):
            for i in range(channels):
                source = (j // per_group) * channels + i
                out = F.conv2d(
                    padded[n : n + 1, source : source + 1].abs().double(),
                    weight[j : j + 1, i : i + 1].abs().double(),
                    stride=conv.stride,
                    dilation=conv.dilation,
                )
                total[j, i] += out.norm()
    return total


CASES = list(itertools.product([1, 2], [0, 1], [1, 3, 5]))


@pytest.mark.parametrize("stride,padding,kernel", CASES)
def test_conv_norm_sum_matches_slow_loop(stride, padding, kernel):
    torch.manual_seed(stride * 100 + padding * 10 + kernel)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, bias=False)
    x = torch.randn(5, 3, 9, 9)
    fast = sum(scores.conv_norm_sum(part.abs(), conv.weight.detach().abs(), conv) for part in x.split([2, 3]))
    slow = _slow_norm_sum(x, conv.weight.detach(), conv)
    assert torch.allclose(fast.double(), slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("in_channels,out_channels,groups,stride", [(4, 6, 2, 1), (6, 6, 6, 2), (3, 6, 3, 1), (8, 4, 4, 1)])
def test_grouped_conv_norm_sum_matches_slow_loop(in_channels, out_channels, groups, stride):
    """Grouped and depthwise convs: a filter's kernels pair with its own group's channels."""
    torch.manual_seed(groups * 10 + stride)
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False)
    x = torch.randn(4, in_channels, 7, 7)
    fast = sum(scores.conv_norm_sum(part.abs(), conv.weight.detach().abs(), conv) for part in x.split([1, 3]))
    slow = _slow_norm_sum(x, conv.weight.detach(), conv)
    assert fast.shape == conv.weight.shape[:2]
    assert torch.allclose(fast.double(), slow, rtol=1e-4, atol=1e-5)


def test_conv_norm_sum_dilation_and_reflect_padding():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode="reflect")
    x = torch.randn(3, 2, 8, 8)
    fast = scores.conv_norm_sum(x.abs(), conv.weight.detach().abs(), conv)
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode="reflect")
    slow = torch.zeros(3, 2, dtype=torch.float64)
    for n, j, i in itertools.product(range(3), range(3), range(2)):
        out = F.conv2d(padded[n : n + 1, i : i + 1].abs().double(), conv.weight[j : j + 1, i : i + 1].detach().abs().double(), dilation=2)
        slow[j, i] += out.norm()
    assert torch.allclose(fast.double(), slow, rtol=1e-4)


class _ConvNet(nn.Module):
    def __init__(self, kernel, stride, padding, bias):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, bias=bias)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("kernel,stride,padding,bias", [(3, 1, 1, True), (5, 2, 0, False), (1, 2, 1, True)])
def test_streamed_statistics_match_formula_over_uneven_batches(kernel, stride, padding, bias):
    """Batches of different sizes summing to N give the paper's a_ij (and the authors' variant)."""
    torch.manual_seed(kernel)
    model = _ConvNet(kernel, stride, padding, bias).eval()
    x = torch.randn(11, 3, 10, 10)
    batches = [ModelInput((part,)) for part in x.split([4, 1, 6])]
    graph = analyse(model, batches[0])
    paper = collect(graph, batches, "paper", model)[input_key("conv")]
    assert float(paper["count"]) == 11
    slow = _slow_norm_sum(x, model.conv.weight.detach(), model.conv) / 11
    assert torch.allclose((paper["norms"].double() / 11), slow, rtol=1e-4, atol=1e-6)

    authors = collect(graph, batches, "authors", model)[input_key("conv")]
    mean_map = authors["abs_map"] / 11
    fast = scores.conv_mean_map_norms(mean_map, model.conv.weight.detach().abs(), model.conv)
    expected = torch.zeros(5, 3, dtype=torch.float64)
    padded = F.pad(x.abs().mean(0, keepdim=True), model.conv._reversed_padding_repeated_twice)
    for j, i in itertools.product(range(5), range(3)):
        out = F.conv2d(padded[:, i : i + 1].double(), model.conv.weight[j : j + 1, i : i + 1].detach().abs().double(), stride=stride)
        expected[j, i] = out.norm()
    assert torch.allclose(fast.double(), expected, rtol=1e-4, atol=1e-6)
    # the authors' variant is a lower bound of the paper's score (norm of mean <= mean of norms)
    assert bool((fast.double() <= slow + 1e-5).all())
    h1 = (10 + 2 * padding - kernel) // stride + 1
    assert math.isclose(float(paper["positions"]) / 11, h1 * h1)


def test_chunk_budget_cpu_constants_and_gpu_share(monkeypatch) -> None:
    from nnrelief.pruning.scores import _GPU_CHUNK_BYTES, ChunkBudget, chunk_budget

    assert chunk_budget(torch.device("cpu")) == ChunkBudget()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (800 * 2**20, 80 * 2**30))
    assert chunk_budget(torch.device("cuda"), element_size=4) == ChunkBudget(25 * 2**20, 25 * 2**20)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * 2**30, 80 * 2**30))
    assert chunk_budget(torch.device("cuda"), element_size=4).patch_elements == _GPU_CHUNK_BYTES // 4


@pytest.mark.parametrize("in_channels,out_channels,groups", [(3, 5, 1), (4, 6, 2)])
def test_conv_norm_sum_does_not_depend_on_the_chunking(in_channels: int, out_channels: int, groups: int) -> None:
    from nnrelief.pruning.scores import ChunkBudget, conv_norm_sum

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=2, groups=groups)
    abs_x, abs_w = torch.rand(7, in_channels, 9, 9), conv.weight.detach().abs()
    one_at_a_time = conv_norm_sum(abs_x, abs_w, conv, budget=ChunkBudget(1, 1))
    all_at_once = conv_norm_sum(abs_x, abs_w, conv, budget=ChunkBudget(2**30, 2**30))
    assert torch.allclose(one_at_a_time, all_at_once, rtol=1e-6)


def _slow_transposed_norms(x: torch.Tensor, weight: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """sum_n || |W_ij| *^T |x_ni| ||_F per (filter j, input channel i), one map at a time
    (groups = 1): the transposed conv's own F.conv_transpose2d, nothing rewritten."""
    inputs, filters = weight.shape[:2]
    total = torch.zeros(filters, inputs, dtype=torch.float64)
    for n, i, j in itertools.product(range(x.shape[0]), range(inputs), range(filters)):
        out = F.conv_transpose2d(
            x[n : n + 1, i : i + 1].abs().double(), weight[i : i + 1, j : j + 1].abs().double(), stride=conv.stride,
            padding=conv.padding, output_padding=conv.output_padding, dilation=conv.dilation,
        )  # fmt: skip
        total[j, i] += out.norm()
    return total


@pytest.mark.parametrize("stride,padding,output_padding,dilation", [(2, 1, 1, 1), (1, 0, 0, 2), (3, 2, 0, 1)])
def test_conv_transpose_scores_match_the_formula(stride, padding, output_padding, dilation):
    """ConvTranspose2d: filter j's incoming connections are the kernels W[i, j] from every input channel i."""
    torch.manual_seed(stride)
    conv = nn.ConvTranspose2d(3, 4, 3, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation)
    model = nn.Sequential(conv, nn.ReLU()).eval()
    x = torch.randn(5, 3, 6, 7)
    graph = analyse(model, ModelInput((x,)))
    entry = collect(graph, [ModelInput((part,)) for part in x.split([2, 3])], "paper", model)[input_key("0")]
    slow = _slow_transposed_norms(x, conv.weight.detach(), conv) / 5
    assert torch.allclose(entry["norms"].double() / 5, slow, rtol=1e-4, atol=1e-6)
    out_h, out_w = conv(x).shape[2:]
    assert float(entry["positions"]) / 5 == out_h * out_w  # the bias term's sqrt(h1 * h2)


def test_conv1d_scores_match_the_formula():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 5, stride=2, padding=2, dilation=1)
    model = nn.Sequential(conv, nn.ReLU()).eval()
    x = torch.randn(6, 3, 20)
    graph = analyse(model, ModelInput((x,)))
    entry = collect(graph, [ModelInput((x,))], "paper", model)[input_key("0")]
    slow = torch.zeros(4, 3, dtype=torch.float64)
    for n, i, j in itertools.product(range(6), range(3), range(4)):
        out = F.conv1d(x[n : n + 1, i : i + 1].abs().double(), conv.weight[j : j + 1, i : i + 1].detach().abs().double(), stride=2, padding=2)
        slow[j, i] += out.norm()
    assert torch.allclose(entry["norms"].double() / 6, slow / 6, rtol=1e-4, atol=1e-6)
