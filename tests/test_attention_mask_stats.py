"""Padding positions (attention_mask == 0) left out of the statistics over token positions:
NNrelief's input |x| sums and activity (captured and pre-hook paths) and Wanda's input norms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnrelief
from nnrelief.analysis import activity_key, analyse, input_key
from nnrelief.experiments.rowwise import input_norms
from nnrelief.inputs import ModelInput, batch_input
from nnrelief.pruning.masks import current_mask
from nnrelief.pruning.stats import collect

transformers = pytest.importorskip("transformers")

VOCAB, LENGTHS, PADDED = 40, (5, 8), 8


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_cache=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _sequences() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (length,), generator=generator) for length in LENGTHS]


def _padded(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded with garbage tokens (all id 0, unlike any real token) and their mask."""
    ids = torch.zeros(len(sequences), PADDED, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    return {"input_ids": ids, "attention_mask": mask}


def _unpadded(sequences: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One batch per sequence, no padding."""
    return [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in sequences]


def _stats(model: nn.Module, batches: list, skip_padding: bool = True) -> dict:
    inputs = [batch_input(batch, index) for index, batch in enumerate(batches)]
    graph = analyse(model, inputs[0], dynamic=len(batches) > 1)
    return collect(graph, inputs, "paper", model, skip_padding)


def _weight_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: current_mask(module, "weight").clone() for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def test_padded_batch_gives_the_statistics_and_masks_of_its_real_tokens() -> None:
    model, sequences = _llama(), _sequences()
    padded, alone = _stats(model, [_padded(sequences)]), _stats(model, _unpadded(sequences))
    counted = _stats(model, [_padded(sequences)], skip_padding=False)
    layer = input_key("model.layers.0.mlp.down_proj")
    assert float(padded[layer]["count"]) == sum(LENGTHS) and float(counted[layer]["count"]) == len(LENGTHS) * PADDED
    assert padded.keys() == alone.keys()
    for key in padded:
        for name in padded[key]:
            assert torch.allclose(padded[key][name], alone[key][name], rtol=1e-5, atol=1e-6), (key, name)
    assert not torch.allclose(counted[layer]["abs_input"], alone[layer]["abs_input"], rtol=1e-3)  # padding did count

    masks = []
    for batches, skip in ((_padded(sequences), True), (_unpadded(sequences), True), (_padded(sequences), False)):
        pruned = copy.deepcopy(model)
        nnrelief.prune(pruned, [batches] if isinstance(batches, dict) else batches, target=0.5, progress=False, skip_padding=skip)
        masks.append(_weight_masks(pruned))
    assert all(torch.equal(masks[0][name], masks[1][name]) for name in masks[0])
    assert any(not torch.equal(masks[0][name], masks[2][name]) for name in masks[0])


def test_collected_mean_equals_mean_over_real_tokens_by_hand() -> None:
    model, batch = _llama(), _padded(_sequences())
    real = batch["attention_mask"].bool()
    seen: dict[str, torch.Tensor] = {}
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0].detach().clone()))
             for name, m in linears.items()]  # fmt: skip
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    stats = _stats(model, [batch])
    for name, x in seen.items():
        entry = stats[input_key(name)]
        collected = entry["abs_input"] / entry["count"]
        assert torch.allclose(collected.float(), x[real].abs().mean(0), rtol=1e-5, atol=1e-7), name


class TokenNet(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear; neuron 0 of fc1 fires on token 0 only (the padding)."""

    def __init__(self, branchy: bool = False) -> None:
        super().__init__()
        self.branchy = branchy
        self.embed = nn.Embedding(VOCAB, 6)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        with torch.no_grad():
            self.embed.weight[:, 0] = 0.0
            self.embed.weight[0, 0] = 1.0
            self.fc1.weight[0] = torch.tensor([1.0, 0, 0, 0, 0, 0])
            self.fc1.bias[0] = 0.0
            self.fc1.weight[1:, 0] = 0.0  # the other neurons ignore the padding feature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.branchy and x.sum() > 0:  # data-dependent control flow: no capture, pre-hooks instead
            x = x * 1.0
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("branchy", [False, True], ids=["captured", "pre-hooks"])
def test_linear_input_statistic_leaves_padding_out(branchy: bool) -> None:
    torch.manual_seed(0)
    model, batch = TokenNet(branchy).eval(), _padded(_sequences())
    stats = _stats(model, [batch])
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        hidden = model.embed(batch["input_ids"])
    entry = stats[input_key("fc1")]
    assert float(entry["count"]) == sum(LENGTHS)
    assert torch.allclose((entry["abs_input"] / entry["count"]).float(), hidden[real].abs().mean(0), atol=1e-6)
    assert float(entry["abs_input"][0]) == 0.0  # the padding feature, seen at padding positions only
    assert float(_stats(model, [batch], skip_padding=False)[input_key("fc1")]["abs_input"][0]) > 0


def test_neuron_active_only_on_padding_is_dead() -> None:
    torch.manual_seed(0)
    model, batch = TokenNet().eval(), _padded(_sequences())
    activity = _stats(model, [batch])[activity_key("fc1")]["activity"]
    assert float(activity[0]) == 0.0 and bool((activity[1:] > 0).all())
    assert float(_stats(model, [batch], skip_padding=False)[activity_key("fc1")]["activity"][0]) > 0
    kept, dead = copy.deepcopy(model), copy.deepcopy(model)
    nnrelief.prune(dead, [batch], alpha_fc=0.99, progress=False)
    nnrelief.prune(kept, [batch], alpha_fc=0.99, progress=False, skip_padding=False)
    assert not bool(current_mask(dead.fc1, "weight")[0].any()) and bool(current_mask(kept.fc1, "weight")[0].any())


def test_batches_without_a_mask_count_every_position() -> None:
    torch.manual_seed(0)
    model = TokenNet().eval()
    ids = _padded(_sequences())["input_ids"]
    inputs = [ModelInput((), {"input_ids": ids, "attention_mask": None})]
    entry = collect(analyse(model, inputs[0], dynamic=False), inputs, "paper", model)[input_key("fc1")]
    assert float(entry["count"]) == ids.numel() and float(entry["abs_input"][0]) > 0


def test_wanda_input_norms_leave_padding_out() -> None:
    model, sequences = _llama(), _sequences()
    padded, alone = input_norms(model, [_padded(sequences)]), input_norms(model, _unpadded(sequences))
    counted = input_norms(model, [_padded(sequences)], skip_padding=False)
    for name in padded.squares:
        for kind in ("l2", "mean"):
            assert torch.allclose(padded.norm(name, kind), alone.norm(name, kind), rtol=1e-6), (name, kind)
    name = "model.layers.0.mlp.down_proj"
    assert float(padded.rows[name]) == sum(LENGTHS) and float(counted.rows[name]) == len(LENGTHS) * PADDED
    assert not torch.allclose(counted.norm(name, "mean"), alone.norm(name, "mean"), rtol=1e-3)
