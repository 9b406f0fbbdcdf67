"""Compaction, export and sparse storage: outputs must match the masked model."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnrelief
from bn_helpers import calibrate_and_dim
from nnrelief.compaction import compact, compaction_summary, format_summary
from nnrelief.compaction.export import export_onnx, export_program, export_torchscript, load_sparse, save_sparse
from nnrelief.compaction.narrowing import ChannelMap
from nnrelief.metrics import summarize
from nnrelief.models import IMAGE_MODELS, get_model, input_shape
from nnrelief.models.resnet_cifar import PadShortcut
from nnrelief.pruning.masks import GATE, gate_of, set_gate, set_mask


def _pruned(name: str, passes: int = 2, samples: int = 4) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = get_model(name, 10)
    x = torch.randn(samples, *input_shape(name))
    calibrate_and_dim(model, x)
    for _ in range(passes):
        nnrelief.prune(model, [x], alpha_fc=0.7, alpha_conv=0.7, score="authors", progress=False)
    return model.eval(), x


def _assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, actual = a(x), b(x)
    assert actual.shape == expected.shape
    assert (expected - actual).abs().max().item() <= 1e-5


def _assert_plain(model: nn.Module) -> None:
    """No masks, gates or hooks left anywhere."""
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert GATE not in module._buffers
        assert not any(name.endswith(("_mask", "_orig")) for name in list(module._buffers) + list(module._parameters))


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
def test_zoo_compacted_outputs_match(name: str) -> None:
    model, x = _pruned(name, passes=1, samples=3)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    compacted = compact(model, x[:2])
    _assert_same(model, compacted, torch.randn_like(x))
    _assert_plain(compacted)
    assert sum(p.numel() for p in compacted.parameters()) < sum(p.numel() for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def pruned_resnet() -> tuple[nn.Module, torch.Tensor]:
    """ResNet-20 after two passes: gated identity and option-A pad shortcuts."""
    return _pruned("resnet20")


@pytest.fixture(scope="module")
def compacted_resnet(pruned_resnet: tuple[nn.Module, torch.Tensor]) -> tuple[nn.Module, torch.Tensor]:
    model, x = pruned_resnet
    return compact(model, x[:2]), x


def test_resnet20_gated_and_pad_shortcuts(
    pruned_resnet: tuple[nn.Module, torch.Tensor], compacted_resnet: tuple[nn.Module, torch.Tensor]
) -> None:
    model, _ = pruned_resnet
    compacted, _ = compacted_resnet
    gated = [name for name, module in model.named_modules() if gate_of(module) is not None]
    assert any("layer1" in name for name in gated), "test needs gated identity shortcuts"
    assert "layer2.0.shortcut" in gated, "test needs a gated option-A pad shortcut"
    _assert_same(model, compacted, torch.randn(8, 3, 32, 32))
    _assert_plain(compacted)
    # The model's own class: the pad shortcuts and the gated identity shortcuts are wrapped in
    # index maps (the padding module still pads; the map picks the kept channels and zeros).
    assert type(compacted) is type(model)
    maps = {name: module for name, module in compacted.named_modules() if isinstance(module, ChannelMap)}
    assert "layer2.0.shortcut" in maps and isinstance(maps["layer2.0.shortcut"].module, PadShortcut)
    assert set(maps) <= {name for name, module in model.named_modules() if "shortcut" in name and not list(module.children())}


def test_residual_stream_channel_removed_only_when_all_members_allow() -> None:
    torch.manual_seed(0)
    model = get_model("resnet20", 10).eval()
    stream = [model.conv1] + [block.conv2 for block in model.layer1]
    norms = [model.bn1] + [block.bn2 for block in model.layer1]
    for conv, norm in zip(stream, norms):  # stage-1 stream channel 0: every producer dead
        keep = torch.ones(16, dtype=torch.bool)
        keep[0] = False
        set_mask(conv, "weight", keep.view(-1, 1, 1, 1).expand_as(conv.weight))
        set_mask(norm, "weight", keep)
        set_mask(norm, "bias", keep)
    block = model.layer1[0]  # stage-1 branch filter 5 of block 0 dead, but the stream still carries it
    keep = torch.ones(16, dtype=torch.bool)
    keep[5] = False
    set_mask(block.conv2, "weight", keep.view(-1, 1, 1, 1).expand_as(block.conv2.weight))
    set_mask(block.bn2, "weight", keep)
    set_mask(block.bn2, "bias", keep)
    gate = torch.ones(32, dtype=torch.bool)
    gate[10] = False  # pad shortcut channel 10 (= source channel 2) gated off
    set_gate(model.layer2[0].shortcut, gate)
    x = torch.randn(4, 3, 32, 32)
    compacted = compact(model, x[:2])
    modules = dict(compacted.named_modules())
    assert modules["conv1"].out_channels == 15
    assert all(modules[f"layer1.{i}.conv1"].in_channels == 15 for i in range(3))
    assert modules["layer1.0.conv2"].out_channels == 15  # channel 5 is kept by the stream
    assert modules["layer2.0.conv1"].in_channels == 15
    assert modules["layer2.0.conv2"].out_channels == 32  # the branch still feeds channels 8 and 10
    _assert_same(model, compacted, torch.randn(8, 3, 32, 32))


class UserNet(nn.Module):
    """A user model: concat, functional channel pad, sigmoid gating, PReLU, view."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, stride=2, padding=1)
        self.prelu = nn.PReLU(8)
        self.d = nn.Conv2d(8, 12, 1)
        self.fc1 = nn.Linear(12 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        z = self.prelu(self.c(y))
        z = self.d(z) + F.pad(z, (0, 0, 0, 0, 2, 2))
        z = F.max_pool2d(z, 2) * torch.sigmoid(z.mean(dim=(2, 3), keepdim=True))
        z = z.view(z.size(0), -1)
        return self.fc2(F.relu(self.fc1(z)))


def test_user_defined_model() -> None:
    torch.manual_seed(0)
    model = UserNet()
    x = torch.randn(8, 3, 16, 16)
    for _ in range(2):
        nnrelief.prune(model, [x], alpha_fc=0.6, alpha_conv=0.6, progress=False)
    model.eval()
    compacted = compact(model, x[:2])
    _assert_same(model, compacted, torch.randn(16, 3, 16, 16))
    _assert_plain(compacted)
    assert compacted.fc1.in_features < 12 * 4 * 4 or compacted.a.out_channels < 6


class HardCodedNet(nn.Module):
    """A channel pad (index maps needed), a depthwise conv and a flatten with a literal size:
    ``view(-1, 192)`` (the batch inferred: the channel size must stay) or
    ``reshape(batch, 192)`` (the channel size can be inferred instead)."""

    def __init__(self, batch_inferred: bool) -> None:
        super().__init__()
        self.batch_inferred = batch_inferred
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(8, 12, 1)
        self.fc1 = nn.Linear(12 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.dw(torch.relu(self.bn(self.a(x)))))
        z = F.max_pool2d(self.b(y) + F.pad(y, (0, 0, 0, 0, 2, 2)), 4)
        z = z.view(-1, 192) if self.batch_inferred else z.reshape(z.shape[0], 192)
        return self.fc2(torch.relu(self.fc1(z)))


@pytest.mark.parametrize("batch_inferred", [False, True])
def test_index_maps_with_literal_sizes(batch_inferred: bool) -> None:
    torch.manual_seed(0)
    model = HardCodedNet(batch_inferred).eval()
    with torch.no_grad():
        for tensor in (model.a.weight, model.a.bias, model.bn.weight, model.bn.bias, model.dw.weight, model.dw.bias):
            tensor[2] = 0  # channel 2 of y dead (padded into z's channel 4)
        for tensor in (model.b.weight, model.b.bias):
            tensor[[0, 11]] = 0  # z's channels 0 and 11 dead (the pad adds zeros there)
    x = torch.randn(6, 3, 16, 16)
    compacted = compact(model, x[:2])
    assert isinstance(compacted, torch.fx.GraphModule)
    _assert_same(model, compacted, x)
    assert compacted.a.out_channels == 7 and compacted.dw.groups == 7 and compacted.b.in_channels == 7
    # The inferred batch pins the flatten's size: z keeps all 12 channels (channel 4 from a zero fill).
    assert compacted.fc1.in_features == (192 if batch_inferred else 160)
    assert compacted.b.out_channels == (12 if batch_inferred else 10)
    # Its layers run as the narrowed modules: MACs count, fewer than the model's.
    assert 0 < summarize(compacted, (3, 16, 16)).macs_dense < summarize(model, (3, 16, 16)).macs_dense
    loaded = load_sparse(save_sparse(compacted, Path(tempfile.mkdtemp()) / "m.pt"), _zeroed(compacted))
    _assert_same(model, loaded.eval(), x)
    # Pruned and compacted again: the GraphModule is a model like any other (its maps kept).
    nnrelief.prune(compacted, [x], alpha_fc=0.6, alpha_conv=0.6, progress=False)
    again = compact(compacted, x[:2])
    _assert_same(compacted, again, x)
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in compacted.parameters())


def test_plain_model_with_zero_rows_and_no_example() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        model[0].weight[1:3] = 0
        model[0].bias[1:3] = 0
    compacted = nnrelief.compact(model)  # the top-level name is the function
    assert compacted.get_submodule("0").out_features == 3
    assert compacted.get_submodule("2").in_features == 3
    _assert_same(model, compacted, torch.randn(4, 6))


class Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated; a
    flatten after the concatenation (``flat``) puts a Linear head right behind it."""

    def __init__(self, flat: bool) -> None:
        super().__init__()
        self.flat = flat
        self.squeeze = nn.Conv2d(3, 6, 1)
        self.expand1x1, self.expand3x3 = nn.Conv2d(6, 5, 1), nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(9 * 16, 3) if flat else nn.Conv2d(9, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = torch.relu(self.squeeze(x))
        expanded = torch.cat([torch.relu(self.expand1x1(squeezed)), torch.relu(self.expand3x3(squeezed))], 1)
        return self.head(expanded.flatten(1)) if self.flat else self.head(expanded).mean((2, 3))


@pytest.mark.parametrize("flat", [False, True])
def test_a_concatenation_branch_that_died_entirely_compacts(flat: bool) -> None:
    """expand3x3 loses every channel (no weight, a negative bias: zero after the ReLU): the
    branch keeps one channel on both sides of the concatenation, as the report says."""
    torch.manual_seed(0)
    model = Fire(flat).eval()
    with torch.no_grad():
        model.expand3x3.weight.zero_()
        model.expand3x3.bias.fill_(-1.0)
    x = torch.randn(4, 3, 4, 4)
    report = nnrelief.prune(model, [x], alpha_fc=0.99, alpha_conv=0.99, progress=False)
    assert {layer.name: layer.channels_alive for layer in report.layers}["expand3x3"] == 0
    compacted = compact(model, x[:2])
    assert isinstance(compacted, Fire) and compacted.expand3x3.out_channels == 1
    widths = {layer.name: layer.channels_compacted for layer in report.layers}
    assert all(compacted.get_submodule(name).out_channels == widths[name] for name in ("squeeze", "expand1x1", "expand3x3"))
    assert sum(p.numel() for p in compacted.parameters()) < sum(p.numel() for p in model.parameters())
    _assert_same(model, compacted, torch.randn(3, 3, 4, 4))


def test_export_torchscript_and_program(compacted_resnet: tuple[nn.Module, torch.Tensor], tmp_path: Path) -> None:
    model, x = compacted_resnet
    with torch.no_grad():
        expected = model(x)
    script = export_torchscript(model, x, tmp_path / "model.ts")
    program = export_program(model, x, tmp_path / "model.pt2")
    with torch.no_grad():
        assert (torch.jit.load(str(script))(x) - expected).abs().max() <= 1e-5
        loaded = torch.export.load(str(program)).module()
        assert (loaded(x[:3]) - expected[:3]).abs().max() <= 1e-5
    assert sorted(os.listdir(tmp_path)) == ["model.pt2", "model.ts"]  # no temp files left


def test_export_onnx_runs_in_onnxruntime(compacted_resnet: tuple[nn.Module, torch.Tensor], tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, x = compacted_resnet
    path = export_onnx(model, x, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.randn(3, 3, 32, 32)
    (out,) = session.run(None, {"input": batch.numpy()})
    with torch.no_grad():
        assert abs(out - model(batch).numpy()).max() <= 1e-5


def test_export_refuses_masked_model(tmp_path: Path) -> None:
    model, x = _pruned("lenet300_100", passes=1)
    with pytest.raises(ValueError, match="masks"):
        export_torchscript(model, x, tmp_path / "m.ts")
    with pytest.raises(ValueError, match="masks"):
        save_sparse(model, tmp_path / "m.pt")
    assert not os.listdir(tmp_path)


def _zeroed(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer zeroed: what load_sparse fills."""
    blank = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in [*blank.parameters(), *blank.buffers()]:
            tensor.zero_()
    return blank


def test_sparse_round_trip(compacted_resnet: tuple[nn.Module, torch.Tensor], tmp_path: Path) -> None:
    model, x = compacted_resnet
    path = save_sparse(model, tmp_path / "sparse.pt")
    assert torch.load(path, weights_only=True)["version"] == 2  # plain tensors, strings and numbers
    loaded = load_sparse(path, _zeroed(model))
    _assert_same(model, loaded.eval(), x)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def _sparse_linear(density: float) -> nn.Module:
    torch.manual_seed(1)
    layer = nn.Linear(1000, 1000)
    with torch.no_grad():
        layer.weight.mul_((torch.rand_like(layer.weight) < density).float())
    return nn.Sequential(layer)


def test_sparse_size_scales_with_remaining_weights(tmp_path: Path) -> None:
    sizes = {}
    for density in (0.2, 0.1, 0.05):
        path = save_sparse(_sparse_linear(density), tmp_path / f"{density}.pt")
        sizes[density] = path.stat().st_size
        loaded = load_sparse(path, _zeroed(_sparse_linear(density)))
        assert torch.equal(loaded[0].weight, _sparse_linear(density)[0].weight)
    assert 0.4 < sizes[0.1] / sizes[0.2] < 0.6
    assert 0.4 < sizes[0.05] / sizes[0.1] < 0.6
    dense = tmp_path / "dense.pt"
    torch.save(_sparse_linear(0.2).state_dict(), dense)
    assert sizes[0.2] < 0.35 * dense.stat().st_size


def test_load_sparse_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not an nnrelief sparse"):
        load_sparse(path)


def test_compaction_summary(tmp_path: Path) -> None:
    model, x = _pruned("lenet5")
    compacted = compact(model, x[:2])
    summary = compaction_summary(model, compacted, (1, 28, 28))
    before, after, files = summary["before"], summary["after"], summary["files"]
    assert before["params_nonzero"] == after["params_nonzero"]
    assert after["params_total"] < before["params_total"]
    assert after["macs_dense"] < before["macs_dense"]
    assert before["macs_sparse"] == after["macs_sparse"]
    assert files["sparse"] < files["dense_masked"] and files["compacted"] < files["dense_masked"]
    assert after["architecture"]["conv1"] == compacted.conv1.out_channels
    text = format_summary(summary)
    assert "MACs per sample" in text and "conv2" in text and "sparse" in text


def test_sparse_keeps_tied_parameters(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    blank = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    blank[2].weight = blank[0].weight
    loaded = load_sparse(save_sparse(model, tmp_path / "tied.pt"), blank)
    assert loaded[2].weight is loaded[0].weight
    _assert_same(model, loaded, torch.randn(3, 4))


def test_an_example_the_model_rejects_is_named_with_its_layer() -> None:
    model = get_model("lenet5", 10)
    with pytest.raises(ValueError, match=r"compact: the model rejected the example of shape \(2, 1, 20, 20\) in layer fc1 \(Linear\)"):
        compact(model, torch.rand(2, 1, 20, 20))


@pytest.mark.parametrize("name", ["resnet20", "lenet5"])
def test_compaction_leaves_the_model_alone_and_shares_no_tensor_with_it(name: str) -> None:
    model, x = _pruned(name)
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    mask_buffers = {key for key, _ in model.named_buffers() if key.endswith("_mask")}
    small = compact(model, x[:2])
    assert model.training and mask_buffers == {key for key, _ in model.named_buffers() if key.endswith("_mask")}
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    theirs = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert not any(id(t) in theirs for t in [*small.parameters(), *small.buffers()])
    with torch.no_grad():
        for parameter in small.parameters():
            parameter.add_(1.0)  # training the small model leaves the pruned one as it was
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
