"""Compatibility matrix: model families beyond the paper's, each pruned three times, checked
for finite outputs, compacted, and checked for the same outputs with fewer parameters.

Hugging Face models are small random-initialised configs built from their config classes
(nothing is downloaded). Hand-built MobileNetV2 / EfficientNet-style blocks stand in for
timm, which needs torchvision (it does not install beside the CPU torch here).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnrelief
from bn_helpers import calibrate_and_dim
from nnrelief.compaction import compact
from nnrelief.models import InvertedResidual
from nnrelief.pruning.masks import current_mask

transformers = pytest.importorskip("transformers")

VOCAB, TOKENS, BATCH = 50, 12, 16


def _text_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[: BATCH // 2, -3:] = 0  # padded sequences
    return {"input_ids": ids, "attention_mask": mask}


def _bert(act: str = "gelu") -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, hidden_act=act,
    )
    return transformers.BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _distilbert() -> nn.Module:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32, num_labels=3,
    )
    return transformers.DistilBertForSequenceClassification(config)


def _falcon() -> nn.Module:  # its Linear layers compute input @ weight.T, not F.linear
    config = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, use_cache=False,
    )
    return transformers.FalconForCausalLM(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


# (builder, batch, FFN producer -> consumer module names of layer 0)
HF_FAMILIES = {
    "bert": (_bert, _text_batch, ("bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense")),
    "gpt2": (_gpt2, _text_batch, ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")),
    "distilbert": (_distilbert, _text_batch, ("distilbert.transformer.layer.0.ffn.lin1", "distilbert.transformer.layer.0.ffn.lin2")),
    "falcon": (_falcon, _text_batch, ("transformer.h.0.mlp.dense_h_to_4h", "transformer.h.0.mlp.dense_4h_to_h")),
    "vit": (_vit, lambda seed=0: {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(seed))},
            ("vit.layers.0.mlp.fc1", "vit.layers.0.mlp.fc2")),
}  # fmt: skip


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _consumer_columns(module: nn.Module) -> torch.Tensor:
    """(in_features, out) view of a Linear or GPT-2 Conv1D weight: rows = inputs."""
    return module.weight.t() if isinstance(module, nn.Linear) else module.weight


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_transformers_prune_three_passes_then_compact(family: str) -> None:
    build, make_batch, (producer, consumer) = HF_FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    modules = dict(model.named_modules())
    with torch.no_grad():  # FFN neurons 0..4 of layer 0 feed nothing: backward cleaning removes them
        _consumer_columns(modules[consumer])[:5] = 0.0
    batch = make_batch()
    embeddings = {n: p.clone() for n, p in model.named_parameters() if "embed" in n or "LayerNorm" in n or "ln_" in n}
    for _ in range(3):
        report = nnrelief.prune(model, [batch], alpha_fc=0.9, progress=False)
        assert torch.isfinite(_logits(model, batch)).all()
    assert report.kept < report.total
    producer_rows = current_mask(modules[producer], "weight")
    producer_rows = producer_rows.t() if not isinstance(modules[producer], nn.Linear) else producer_rows
    assert not producer_rows[:5].any()  # whole intermediate neurons removed, incoming side too
    if current_mask(modules[producer], "bias") is not None:
        assert not current_mask(modules[producer], "bias")[:5].any()
    for name, parameter in model.named_parameters():  # embeddings and LayerNorms never touched
        if name in embeddings:
            assert torch.equal(parameter, embeddings[name]), name
    small = compact(model, make_batch(1))
    other = make_batch(2)
    torch.testing.assert_close(_logits(small, other), _logits(model, other), rtol=1e-4, atol=1e-5)
    assert _params(small) < _params(model)
    full = _consumer_columns(modules[consumer]).shape[0]
    assert _consumer_columns(dict(small.named_modules())[consumer]).shape[0] <= full - 5


def test_dead_ffn_neurons_die_through_relu_and_tied_head_is_left_alone() -> None:
    torch.manual_seed(0)
    model = _bert(act="relu").eval()
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.bias[:3] = -1e3  # never active
    batch = _text_batch()
    before = _logits(model, batch)
    nnrelief.prune(model, [batch], alpha_fc=1.0, progress=False)
    torch.testing.assert_close(_logits(model, batch), before, rtol=1e-4, atol=1e-5)
    output = model.bert.encoder.layer[1].output.dense
    assert not current_mask(output, "weight")[:, :3].any()
    assert current_mask(output, "weight")[:, 3:].any(0).all()

    gpt = _gpt2().eval()
    report = nnrelief.prune(gpt, [_text_batch()], alpha_fc=0.9, progress=False)
    assert "lm_head" in report.skipped and "tied" in report.skipped["lm_head"]
    assert gpt.lm_head.weight is gpt.transformer.wte.weight


def test_batches_as_positional_tuples_and_pairs() -> None:
    torch.manual_seed(0)
    model = _bert().eval()
    batch = _text_batch()
    labels = torch.zeros(BATCH, dtype=torch.long)
    positional = ((batch["input_ids"], batch["attention_mask"]), labels)  # (inputs, target)
    nnrelief.prune(model, [positional, (batch, labels)], alpha_fc=0.9, progress=False)
    small = compact(model, (batch["input_ids"][:2], batch["attention_mask"][:2]))
    torch.testing.assert_close(_logits(small, batch), _logits(model, batch), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- conv families


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.expand(F.silu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class MBConv(nn.Module):
    """EfficientNet block: expand -> BN -> SiLU -> depthwise -> BN -> SiLU -> SE -> project -> BN (+ x)."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.se = SqueezeExcite(hidden, max(1, channels // 2))
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class TinyConvNet(nn.Module):
    def __init__(self, blocks: nn.Module, width: int, out_width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = blocks
        self.head = nn.Linear(out_width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


CONV_FAMILIES = {
    "mobilenetv2-blocks": lambda: TinyConvNet(
        nn.Sequential(InvertedResidual(8, 8, 1, 4), InvertedResidual(8, 16, 2, 4), InvertedResidual(16, 16, 1, 4)), 8, 16
    ),
    "efficientnet-blocks": lambda: TinyConvNet(nn.Sequential(MBConv(8), MBConv(8)), 8, 8),
}  # fmt: skip


@pytest.mark.parametrize("family", list(CONV_FAMILIES))
def test_depthwise_families_prune_three_passes_then_compact(family: str, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = CONV_FAMILIES[family]()
    x = torch.randn(BATCH, 3, 12, 12)
    calibrate_and_dim(model, x, zero_shift=True)
    with caplog.at_level(logging.WARNING, logger="nnrelief"):
        for _ in range(3):
            report = nnrelief.prune(model, [x], alpha_fc=0.9, alpha_conv=0.8, progress=False)
            with torch.no_grad():
                assert torch.isfinite(model(x)).all()
    assert "not scored" not in caplog.text and not report.skipped
    depthwise = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(name in {layer.name for layer in report.layers} for name in depthwise)
    small = compact(model, x[:2])
    other = torch.randn(BATCH, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(other), model(other), rtol=1e-4, atol=1e-5)
    assert _params(small) < _params(model)
    narrowed = [m for m in small.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    original = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert sum(m.out_channels for m in narrowed) < sum(m.out_channels for m in original)
