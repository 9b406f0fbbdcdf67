"""The one channel graph on models torch.fx never traced: planted dead neurons and channels are
removed by a pass (gated MLPs, Hugging Face conv nets, shared modules, torch.nn transformer
blocks), layers the rules cannot score are listed with a reason, and the capture is reused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nnrelief
from bn_helpers import calibrate_and_dim
from nnrelief.analysis import analyse, map_axis
from nnrelief.inputs import ModelInput
from nnrelief.pruning.masks import current_mask

transformers = pytest.importorskip("transformers")

VOCAB = 50


def _text(batch: int = 8, tokens: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, tokens), generator=generator)}


def _rows_removed(module: nn.Module, rows: slice) -> bool:
    mask = current_mask(module, "weight")
    bias = current_mask(module, "bias")
    return not mask[rows].any() and (bias is None or not bias[rows].any())


def test_map_axis_follows_flatten_reshape_and_channels_last() -> None:
    assert map_axis((None, 16, 8, 8), 1, (None, 1024)) == (1, 1, 64)  # NCHW flatten: blocks of 64
    assert map_axis((None, 8, 8, 16), 3, (None, 1024)) == (1, 64, 1)  # channels-last: interleaved
    assert map_axis((None, 12, 64), 2, (None, 64)) == (1, 1, 1)  # (B, T, F) -> (B*T, F)
    assert map_axis((None, 12, 32), 2, (None, 12, 4, 8)) is None  # split into heads: not followed


def test_llama_gated_mlp_neurons_die_with_their_down_projection_column() -> None:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, :8] = 0.0  # intermediate neurons 0..7 feed nothing
    report = nnrelief.prune(model, [_text()], alpha_fc=0.95, progress=False)
    assert report.analysis == "channel graph"
    assert _rows_removed(mlp.gate_proj, slice(0, 8)) and _rows_removed(mlp.up_proj, slice(0, 8))
    assert current_mask(mlp.gate_proj, "weight")[8:].any(dim=1).all()  # the others live on
    small = nnrelief.compact(model, _text(2, seed=1))
    assert type(small) is type(model)  # narrowed in place: the user's class
    narrowed = small.model.layers[0].mlp
    assert narrowed.gate_proj.out_features == narrowed.up_proj.out_features == narrowed.down_proj.in_features <= 56
    other = _text(4, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(small(**other).logits, model(**other).logits, rtol=1e-4, atol=1e-5)


def test_hf_resnet_filters_of_dead_batchnorm_channels_are_removed() -> None:
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config).eval()
    inner = model.resnet.encoder.stages[1].layers[0].layer[0]  # conv -> BN -> ReLU inside a block
    with torch.no_grad():
        inner.normalization.weight[:8] = 0.0
        inner.normalization.bias[:8] = 0.0
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = nnrelief.prune(model, [{"pixel_values": x}], alpha_conv=0.95, progress=False)
    assert report.analysis == "channel graph"
    assert _rows_removed(inner.convolution, slice(0, 8))
    consumer = model.resnet.encoder.stages[1].layers[0].layer[1].convolution
    assert not current_mask(consumer, "weight")[:, :8].any()  # and the kernels reading them
    small = nnrelief.compact(model, {"pixel_values": x[:2]})
    assert type(small) is type(model)
    narrowed = small.resnet.encoder.stages[1].layers[0].layer
    assert narrowed[0].convolution.out_channels == narrowed[0].normalization.num_features == narrowed[1].convolution.in_channels <= 24
    other = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(pixel_values=other).logits, model(pixel_values=other).logits, rtol=1e-4, atol=1e-5)


class TwiceCalled(nn.Module):
    """One hidden layer applied to two inputs: its statistics pool both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.head = nn.Linear(6, 8), nn.Linear(16, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.shared(a)), torch.relu(self.shared(b))], dim=1))


def test_a_module_called_twice_is_cleaned_only_where_both_calls_agree() -> None:
    torch.manual_seed(0)
    model = TwiceCalled().eval()
    with torch.no_grad():
        model.head.weight[:, 0] = 0.0  # neuron 0 unused by the first call only
        model.head.weight[:, [1, 9]] = 0.0  # neuron 1 unused by both calls
    a, b = torch.randn(20, 6), torch.randn(20, 6)
    graph = analyse(model, ModelInput((a, b)))
    assert len(graph.layers["shared"].calls) == 2
    nnrelief.prune(model, [((a, b),)], alpha_fc=1.0, progress=False)
    alive = current_mask(model.shared, "weight").any(dim=1)
    assert not alive[1] and alive[0] and alive[2:].all()
    small = nnrelief.compact(model, (a[:2], b[:2]))
    assert type(small) is TwiceCalled and small.shared.out_features == 7 and small.head.in_features == 14
    with torch.no_grad():
        torch.testing.assert_close(small(a, b), model(a, b), rtol=1e-4, atol=1e-5)


def test_torch_transformer_encoder_scores_every_linear_and_lists_the_packed_projection() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].layers[0].linear2.weight[:, :4] = 0.0  # four FFN neurons feed nothing
    x = torch.randn(4, 5, 16)
    report = nnrelief.prune(model, [x], alpha_fc=0.95, progress=False)
    names = {entry.name for entry in report.layers}
    for index in range(2):
        assert {f"0.layers.{index}.linear1", f"0.layers.{index}.linear2", f"0.layers.{index}.self_attn.out_proj"} <= names
        assert "packed query/key/value" in report.skipped[f"0.layers.{index}.self_attn"]
    small = nnrelief.compact(model, x[:2])
    assert type(small) is nn.Sequential and small[0].layers[0].linear1.out_features <= 28
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_recurrent_layers_are_listed_as_skipped() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.out = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(x)[0])

    report = nnrelief.prune(Tagger().eval(), [torch.randn(3, 5, 4)], progress=False)
    assert "recurrent" in report.skipped["rnn"]


def test_the_capture_is_reused_until_the_modules_change() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = ModelInput((torch.randn(5, 6),))
    first = analyse(model, x)
    assert analyse(model, ModelInput((torch.randn(9, 6),))) is first  # another batch size: same capture
    nnrelief.prune(model, [x.args[0]], progress=False)  # masks zero weights in place: the graph stays
    assert analyse(model, x) is first
    model[1] = nn.Tanh()  # a module replaced: captured again
    second = analyse(model, x)
    assert second is not first and analyse(model, x) is second


class AudioNet(nn.Module):
    """A Conv1d front end (waveform -> features) with BatchNorm1d, a residual 1-d block, pooling and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv1d(1, 16, 9, stride=4, padding=4), nn.BatchNorm1d(16)
        self.conv1, self.bn1 = nn.Conv1d(16, 24, 3, padding=1), nn.BatchNorm1d(24)
        self.conv2, self.bn2 = nn.Conv1d(24, 16, 3, padding=1), nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(wave)))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean(dim=2))


class TinyUNet(nn.Module):
    """Down, bottleneck, ConvTranspose2d up and a skip concatenation along channels."""

    def __init__(self) -> None:
        super().__init__()
        self.down, self.bn_down = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mid, self.bn_mid = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fuse, self.bn_fuse = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.bn_down(self.down(x)))
        y = torch.relu(self.bn_mid(self.mid(skip)))
        y = torch.relu(self.up(y))
        return self.out(torch.relu(self.bn_fuse(self.fuse(torch.cat([y, skip], dim=1)))))


def _plant_dead(norm: nn.Module, count: int) -> None:
    with torch.no_grad():
        norm.weight[:count] = 0.0
        norm.bias[:count] = 0.0


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _same_outputs(small: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_conv1d_audio_net_prunes_cleans_and_compacts_in_place() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 64)
    model = _calibrated(AudioNet(), x)
    _plant_dead(model.bn1, 6)  # six filters of conv1 dead: their kernels in conv2 go too
    report = nnrelief.prune(model, [x], alpha_conv=0.95, alpha_fc=0.95, progress=False)
    assert {"stem", "conv1", "conv2"} <= {entry.name for entry in report.layers} and not report.skipped
    assert _rows_removed(model.conv1, slice(0, 6)) and not current_mask(model.conv2, "weight")[:, :6].any()
    small = nnrelief.compact(model, x[:2])
    assert type(small) is AudioNet and small.conv1.out_channels <= 18 and small.conv2.in_channels == small.conv1.out_channels
    _same_outputs(small, model, torch.randn(4, 1, 64))


def test_unet_with_transposed_conv_and_skip_concatenation() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    model = _calibrated(TinyUNet(), x)
    _plant_dead(model.bn_mid, 4)  # dead bottleneck channels: the transposed conv's inputs from them go
    with torch.no_grad():
        model.fuse.weight[:, 8:11] = 0.0  # three skip channels no one reads: the down filters go
        model.mid.weight[:, :3] = 0.0
    nnrelief.prune(model, [x], alpha_conv=0.98, progress=False)
    assert not current_mask(model.up, "weight")[:4].any()  # ConvTranspose2d weight: (in, out, kh, kw)
    assert _rows_removed(model.down, slice(0, 3))
    small = nnrelief.compact(model, x[:2])
    assert type(small) is TinyUNet and small.up.in_channels <= 12 and small.down.out_channels <= 5
    assert small.fuse.in_channels == small.up.out_channels + small.down.out_channels
    _same_outputs(small, model, torch.randn(3, 3, 8, 8))


def _t5() -> nn.Module:
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8))


def _albert() -> nn.Module:  # one layer's weights shared by every layer of the encoder
    config = transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return transformers.AlbertForSequenceClassification(config)


def _convnext() -> nn.Module:  # channels-last blocks: depthwise conv, then Linear layers on (B, H, W, C)
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=3)
    return transformers.ConvNextForImageClassification(config)


def _images(seed: int, batch: int = 8) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


# family -> (builder, batch maker, FFN consumer whose first 5 input columns are zeroed, its producer)
PLANTED_FFNS = {
    "t5": (_t5, _text, "encoder.block.0.layer.1.DenseReluDense.wo", "encoder.block.0.layer.1.DenseReluDense.wi"),
    "albert": (_albert, _text, "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output",
               "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn"),
    "convnext": (_convnext, _images, "convnext.encoder.stages.0.layers.0.pwconv2", "convnext.encoder.stages.0.layers.0.pwconv1"),
}  # fmt: skip


def _main_output(output: object) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("family", list(PLANTED_FFNS))
def test_planted_ffn_neurons_are_removed_and_compacted_in_the_users_class(family: str) -> None:
    build, batch, consumer, producer = PLANTED_FFNS[family]
    torch.manual_seed(0)
    model = build().eval()
    modules = dict(model.named_modules())
    with torch.no_grad():
        modules[consumer].weight[:, :5] = 0.0
    for _ in range(2):
        report = nnrelief.prune(model, [batch(seed=0)], alpha_fc=0.95, alpha_conv=0.95, progress=False)
    assert report.analysis == "channel graph"
    assert _rows_removed(modules[producer], slice(0, 5))
    small = nnrelief.compact(model, batch(seed=1))
    assert type(small) is type(model)
    assert dict(small.named_modules())[producer].out_features <= modules[producer].out_features - 5
    other = batch(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(_main_output(small(**other)), _main_output(model(**other)), rtol=1e-4, atol=1e-5)


def test_hf_mobilenetv2_dead_channels_removed_and_compacted() -> None:
    config = transformers.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.35, num_labels=3)
    torch.manual_seed(0)
    model = transformers.MobileNetV2ForImageClassification(config)
    x = _images(0, batch=16)["pixel_values"]
    calibrate_and_dim(model, x, zero_shift=True)  # BN statistics from data (HF's init makes signals vanish), a quarter dead
    report = nnrelief.prune(model, [{"pixel_values": x}], alpha_conv=0.95, alpha_fc=0.99, progress=False)
    assert report.analysis == "channel graph" and 0 < report.kept < report.total
    small = nnrelief.compact(model, {"pixel_values": x[:2]})
    assert type(small) is type(model) and sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    other = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(pixel_values=other).logits, model(pixel_values=other).logits, rtol=1e-4, atol=1e-5)


class DenseBlock(nn.Module):
    """DenseNet-style: every layer reads the concatenation of all earlier feature maps."""

    def __init__(self, width: int = 8, growth: int = 6, layers: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.norms = nn.ModuleList(nn.BatchNorm2d(width + k * growth) for k in range(layers))
        self.convs = nn.ModuleList(nn.Conv2d(width + k * growth, growth, 3, padding=1) for k in range(layers))
        self.head = nn.Linear(width + layers * growth, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        for norm, conv in zip(self.norms, self.convs):
            features = torch.cat([features, conv(torch.relu(norm(features)))], dim=1)
        return self.head(features.mean(dim=(2, 3)))


def test_densenet_block_concatenations_prune_and_compact_in_place() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = _calibrated(DenseBlock(), x)
    with torch.no_grad():  # two channels of the first layer's output are read by nobody
        for conv in model.convs[1:]:
            conv.weight[:, 8:10] = 0.0
        model.head.weight[:, 8:10] = 0.0
    nnrelief.prune(model, [x], alpha_conv=0.98, alpha_fc=0.98, progress=False)
    assert _rows_removed(model.convs[0], slice(0, 2))
    small = nnrelief.compact(model, x[:2])
    assert type(small) is DenseBlock and small.convs[0].out_channels <= 4
    assert small.head.in_features == small.stem.out_channels + sum(conv.out_channels for conv in small.convs)
    _same_outputs(small, model, torch.randn(3, 3, 8, 8))


class WithAuxHead(nn.Module):
    """An auxiliary head used only in training, and (``branchy``) data-dependent control flow."""

    def __init__(self, branchy: bool) -> None:
        super().__init__()
        self.branchy = branchy
        self.body, self.head, self.aux = nn.Linear(6, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branchy and x.sum() > 0:  # torch.export cannot capture this
            x = x * 2
        hidden = torch.relu(self.body(x))
        return self.head(hidden) + (self.aux(hidden) if self.training else 0)


@pytest.mark.parametrize("branchy", [False, True], ids=["captured", "connection-level"])
def test_a_layer_that_never_runs_is_skipped_and_listed(branchy: bool) -> None:
    torch.manual_seed(0)
    model = WithAuxHead(branchy)
    report = nnrelief.prune(model, [torch.randn(10, 6)], alpha_fc=0.9, progress=False)
    assert "aux" in report.skipped and "never" in report.skipped["aux"]
    assert {entry.name for entry in report.layers} == {"body", "head"}
    assert report.analysis.startswith("connection level") == branchy
    assert model.training  # the user's mode is restored
