"""The table of layer kinds: layouts, and the kinds added by their entries alone (Conv3d,
ConvTranspose1d/3d) scored on the paper's formula, cleaned and compacted."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnrelief
from nnrelief.analysis import analyse, find_layers, input_key
from nnrelief.experiments.baselines import magnitude_prune, prunable_layers
from nnrelief.inputs import ModelInput
from nnrelief.kinds import KINDS, ConvKind, ConvTransposeKind, kind_of, regroup
from nnrelief.pruning import scores
from nnrelief.pruning.masks import current_mask
from nnrelief.pruning.stats import collect

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _slow_conv_norms(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """sum_n || |K_ji| * |x_ni| ||_F per (filter j, input channel i of j's group): one
    single-channel conv per (n, j, i), on the input padded as the layer pads it (any mode)."""
    weight = conv.weight.detach()
    filters, channels = weight.shape[:2]
    per_group = filters // conv.groups
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    total = torch.zeros(filters, channels, dtype=torch.float64)
    for n, j, i in itertools.product(range(x.shape[0]), range(filters), range(channels)):
        source = (j // per_group) * channels + i
        out = _CONV[x.dim() - 2](padded[n : n + 1, source : source + 1].abs().double(), weight[j : j + 1, i : i + 1].abs().double(),
                                 stride=conv.stride, dilation=conv.dilation)  # fmt: skip
        total[j, i] += out.norm()
    return total


def _slow_transposed_norms(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """sum_n || |W_ij| *^T |x_ni| ||_F per (filter j, input channel i) (groups = 1): the
    transposed conv's own F.conv_transpose1d/3d on one channel and one kernel at a time."""
    weight = conv.weight.detach()
    inputs, filters = weight.shape[:2]
    total = torch.zeros(filters, inputs, dtype=torch.float64)
    for n, i, j in itertools.product(range(x.shape[0]), range(inputs), range(filters)):
        out = _CONV_TRANSPOSE[x.dim() - 2](
            x[n : n + 1, i : i + 1].abs().double(), weight[i : i + 1, j : j + 1].abs().double(), stride=conv.stride,
            padding=conv.padding, output_padding=conv.output_padding, dilation=conv.dilation,
        )  # fmt: skip
        total[j, i] += out.norm()
    return total


def _statistics(conv: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pass's streamed statistics of ``conv`` alone, over two uneven batches."""
    model = nn.Sequential(conv, nn.ReLU()).eval()
    graph = analyse(model, ModelInput((x,)))
    assert list(graph.layers) == ["0"] and graph.layers["0"].kind == "conv"
    batches = [ModelInput((part,)) for part in x.split([1, x.shape[0] - 1])]
    return collect(graph, batches, "paper", model)[input_key("0")]


@pytest.mark.parametrize(
    "stride,padding,dilation,groups,padding_mode",
    [(1, 1, 1, 1, "zeros"), (2, 0, 1, 1, "zeros"), (1, 2, 2, 2, "zeros"), (2, 1, 1, 4, "reflect")],
)
def test_conv3d_scores_match_the_formula(stride: int, padding: int, dilation: int, groups: int, padding_mode: str) -> None:
    torch.manual_seed(stride + 10 * groups)
    conv = nn.Conv3d(4, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)
    x = torch.randn(3, 4, 6, 5, 7)
    entry = _statistics(conv, x)
    assert torch.allclose(entry["norms"].double(), _slow_conv_norms(x, conv), rtol=1e-4, atol=1e-6)
    assert float(entry["positions"]) / 3 == conv(x).shape[2:].numel()  # the bias term's sqrt(h1 h2 h3)


@pytest.mark.parametrize(
    "dims,stride,padding,output_padding,dilation",
    [(1, 2, 1, 1, 1), (1, 1, 0, 0, 2), (1, 3, 2, 0, 1), (3, 2, 1, 1, 1), (3, 1, 0, 0, 2)],
)
def test_conv_transpose_1d_3d_scores_match_the_formula(dims: int, stride: int, padding: int, output_padding: int, dilation: int) -> None:
    torch.manual_seed(dims * 10 + stride)
    conv_type = {1: nn.ConvTranspose1d, 3: nn.ConvTranspose3d}[dims]
    conv = conv_type(3, 4, 3, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation)
    x = torch.randn(3, 3, *((5, 4, 3) if dims == 3 else (9,)))
    entry = _statistics(conv, x)
    assert torch.allclose(entry["norms"].double(), _slow_transposed_norms(x, conv), rtol=1e-4, atol=1e-6)
    assert float(entry["positions"]) / 3 == conv(x).shape[2:].numel()


@pytest.mark.parametrize("conv", [nn.Conv3d(3, 4, 2, stride=2, padding=1), nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1),
                                  nn.ConvTranspose3d(3, 4, 2, stride=2)])  # fmt: skip
def test_authors_scores_of_the_new_kinds_match_the_formula(conv: nn.Module) -> None:
    """score="authors": || |K_ji| * mean_n |x_ni| ||, the layer's own (transposed) conv of the mean map."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, *((5,) * (conv.weight.dim() - 2)))
    model = nn.Sequential(conv, nn.ReLU()).eval()
    graph = analyse(model, ModelInput((x,)))
    entry = collect(graph, [ModelInput((x,))], "authors", model)[input_key("0")]
    contrib, _ = scores.contributions(conv, "conv", entry, "authors")
    mean = x.abs().mean(0, keepdim=True).double()
    weight = conv.weight.detach().abs().double()
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for j, i in itertools.product(range(4), range(3)):
        if isinstance(conv, nn.Conv3d):
            out = F.conv3d(F.pad(mean[:, i : i + 1], [1] * 6), weight[j : j + 1, i : i + 1], stride=2)
        else:
            transposed = _CONV_TRANSPOSE[x.dim() - 2]
            out = transposed(mean[:, i : i + 1], weight[i : i + 1, j : j + 1], stride=conv.stride, padding=conv.padding)
        expected[j, i] = out.norm()
    assert torch.allclose(contrib.double(), expected, rtol=1e-4, atol=1e-6)


def test_every_kind_lays_its_weight_out_as_out_in_and_back() -> None:
    """kernel(): (out, in / groups, *kernel) for every kind; stored() undoes it."""
    for module in [nn.Linear(3, 5), nn.Conv1d(4, 6, 3, groups=2), nn.Conv3d(2, 5, 2), nn.ConvTranspose1d(4, 6, 3, groups=2),
                   nn.ConvTranspose3d(3, 5, 2)]:  # fmt: skip
        kind = kind_of(module)
        kernel = kind.kernel(module, module.weight)
        out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        inputs = module.in_features if isinstance(module, nn.Linear) else module.in_channels // module.groups
        assert kernel.shape[:2] == (out, inputs)
        assert torch.equal(kind.stored(module, kernel), module.weight)
    grouped = torch.arange(4 * 3 * 2.0).view(4, 3, 2)  # (in 4, out/g 3) in 2 groups
    assert torch.equal(regroup(grouped, 2)[3:, :, 0], grouped[2:, :, 0].t())  # group 1's filters read its inputs 2, 3


def test_the_table_is_what_the_analysis_scores() -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Conv3d(3, 3, 1), nn.ConvTranspose1d(3, 3, 2), nn.ConvTranspose3d(3, 3, 1),
                          nn.Linear(3, 2), nn.Bilinear(2, 2, 2))  # fmt: skip
    layers, skipped = find_layers(model)
    assert list(layers) == ["0", "1", "2", "3", "4"] and list(skipped) == ["5"]
    assert all(kind.name in skipped["5"] for kind in KINDS)
    assert isinstance(kind_of(model[2]), ConvTransposeKind) and type(kind_of(model[1])) is ConvKind
    assert set(prunable_layers(model)) == set(layers)  # the baselines accept every kind the pass accepts


class Volume(nn.Module):
    """Conv3d with BatchNorm3d, a strided Conv3d, a ConvTranspose3d up and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8)
        self.conv2 = nn.Conv3d(8, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(6, 5, 2, stride=2)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.up(torch.relu(self.conv2(h))))
        return self.head(h.mean((2, 3, 4)))


class Signal(nn.Module):
    """Conv1d down, ConvTranspose1d up, Conv1d head (a 1-d encoder-decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv1d(2, 8, 4, stride=2, padding=1)
        self.up = nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1)
        self.head = nn.Conv1d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(torch.relu(self.down(x)))))


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _dead_rows(module: nn.Module) -> torch.Tensor:
    """Output channels with no weight and no bias kept."""
    weight = kind_of(module).kernel(module, current_mask(module, "weight")).flatten(1).any(1)
    bias = current_mask(module, "bias")
    return ~(weight | bias) if bias is not None else ~weight


@pytest.mark.parametrize("net,shape", [(Volume, (2, 6, 6, 6)), (Signal, (2, 16))])
def test_new_kinds_are_cleaned_and_compacted(net: type[nn.Module], shape: tuple[int, ...]) -> None:
    """Dead channels planted before the ConvTranspose: its kernels from them are cleaned away,
    its own dead filters cut the consumer's columns, and compaction narrows every kind."""
    torch.manual_seed(0)
    x = torch.randn(6, *shape)
    model = _calibrated(net(), x)
    first = model.conv2 if net is Volume else model.down
    with torch.no_grad():
        first.weight[:3] = 0.0
        first.bias[:3] = 0.0
        model.up.weight[:, :2] = 0.0  # two transposed-conv filters without inputs ...
        model.up.bias[:2] = -1.0  # ... and below zero: dead after the ReLU
    nnrelief.prune(model, [x], alpha_conv=0.95, alpha_fc=0.95, progress=False)
    assert not current_mask(model.up, "weight")[:3].any()  # ConvTranspose weight: (in, out, ...): in channels of dead filters
    consumer = model.head
    columns = kind_of(consumer).kernel(consumer, current_mask(consumer, "weight"))[:, :2]
    assert bool(_dead_rows(model.up)[:2].all()) and not columns.any()
    small = nnrelief.compact(model, x[:2])
    assert type(small) is net
    assert small.up.in_channels <= model.up.in_channels - 3 and small.up.out_channels <= model.up.out_channels - 2
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        probe = torch.randn(3, *shape)
        torch.testing.assert_close(small(probe), model(probe), rtol=1e-4, atol=1e-5)


def test_a_grouped_transposed_conv_is_kept_whole_and_the_rest_compacts() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 6, 3), nn.ReLU(), nn.ConvTranspose1d(6, 4, 2, stride=2, groups=2), nn.ReLU(), nn.Conv1d(4, 3, 1))
    with torch.no_grad():
        model[4].weight[:, 0] = 0.0  # a channel of the grouped layer no one reads: kept, its group is whole
    x = torch.randn(4, 2, 9)
    nnrelief.prune(model, [x], alpha_conv=0.9, progress=False)
    small = nnrelief.compact(model, x[:2])
    assert (small[2].in_channels, small[2].out_channels, small[2].weight.shape) == (6, 4, model[2].weight.shape)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_baselines_prune_every_kind() -> None:
    torch.manual_seed(0)
    model = Volume()
    kept = {name: module.weight.numel() // 2 for name, module in prunable_layers(model).items()}
    report = magnitude_prune(model, kept)
    assert [layer.name for layer in report.layers] == ["conv1", "conv2", "up", "head"]
    assert [layer.kind for layer in report.layers] == ["conv", "conv", "conv", "linear"]
    assert all(layer.weights_kept + layer.bias_kept == kept[layer.name] for layer in report.layers)


@pytest.mark.parametrize("transposed", [False, True])
def test_slicing_gathers_rows_and_columns_into_a_new_weight_and_leaves_a_whole_layer_alone(transposed: bool) -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    module = Conv1D(5, 4) if transposed else nn.Linear(4, 5)
    kind = kind_of(module)
    matrix = kind.kernel(module, module.weight.detach()).clone()  # (out, in)
    bias, weight = module.bias.detach().clone(), module.weight
    kind.slice(module, None, None)
    assert module.weight is weight
    rows, cols = torch.tensor([0, 2, 4]), torch.tensor([1, 3])
    kind.slice(module, rows, cols)
    assert module.weight.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    assert torch.equal(kind.kernel(module, module.weight.detach()), matrix[rows][:, cols]) and module.weight.is_contiguous()
    assert torch.equal(module.bias.detach(), bias[rows])
