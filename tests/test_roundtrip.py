"""``nnrelief.state_dict`` / ``nnrelief.load_state_dict``: a compacted (or masked) model saved
as tensors and primitive values, loaded back into a fresh instance of its own class."""

from __future__ import annotations

import io
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import transformers

import nnrelief
from bn_helpers import calibrate_and_dim
from nnrelief.compaction.narrowing import ChannelMap
from nnrelief.models import get_model
from nnrelief.pruning.masks import current_mask, gate_of, is_masked

IDS = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(1))


class SmallCNN(nn.Module):
    """A user's own CNN: conv-BN, a depthwise conv, a flatten into two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.fc1 = nn.Linear(12 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.dw(torch.relu(self.bn(self.conv(x)))))
        return self.fc2(torch.relu(self.fc1(nn.functional.max_pool2d(y, 2).flatten(1))))


def _cnn() -> tuple[Callable[[], nn.Module], Any]:
    return SmallCNN, torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _resnet20() -> tuple[Callable[[], nn.Module], Any]:
    return lambda: get_model("resnet20", 10), torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _llama() -> tuple[Callable[[], nn.Module], Any]:
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    return lambda: transformers.LlamaForCausalLM(config), {"input_ids": IDS}


def _bert() -> tuple[Callable[[], nn.Module], Any]:
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)  # fmt: skip
    return lambda: transformers.BertForSequenceClassification(config), {"input_ids": IDS}


CASES = {"custom cnn": _cnn, "resnet20": _resnet20, "llama": _llama, "bert": _bert}


def _outputs(model: nn.Module, batch: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def _pruned(case: str, passes: int = 2) -> tuple[Callable[[], nn.Module], nn.Module, Any]:
    make, batch = CASES[case]()
    torch.manual_seed(0)
    model = make()
    if case == "resnet20":
        calibrate_and_dim(model, batch)
    for _ in range(passes):
        nnrelief.prune(model, [batch], alpha_fc=0.6, alpha_conv=0.6, score="authors", progress=False)
    return make, model.eval(), batch


def _through_file(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_a_compacted_model_loads_back_into_a_fresh_instance_of_its_class(case: str) -> None:
    make, model, batch = _pruned(case)
    example = {key: value[:2] for key, value in batch.items()} if isinstance(batch, dict) else batch[:2]
    small = nnrelief.compact(model, example).eval()
    assert type(small) is type(model) and _count(small) < _count(make())
    fresh = make()
    loaded = nnrelief.load_state_dict(fresh, _through_file(nnrelief.state_dict(small)))
    assert loaded is fresh and type(loaded) is type(small)
    assert _count(loaded.eval()) == _count(small)
    assert torch.equal(_outputs(loaded, batch), _outputs(small, batch))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    shapes = {name: (m.in_features, m.out_features) for name, m in small.named_modules() if isinstance(m, nn.Linear)}
    assert shapes == {name: (m.in_features, m.out_features) for name, m in loaded.named_modules() if isinstance(m, nn.Linear)}
    if case == "resnet20":  # the pad shortcuts' index maps come back around the same modules
        maps = {name: (m.index.tolist(), m.axis, m.zero_fill) for name, m in small.named_modules() if isinstance(m, ChannelMap)}
        assert "layer2.0.shortcut" in maps
        assert maps == {name: (m.index.tolist(), m.axis, m.zero_fill) for name, m in loaded.named_modules() if isinstance(m, ChannelMap)}
    if case == "custom cnn":
        assert (loaded.dw.groups, loaded.dw.in_channels, loaded.bn.num_features) == (small.dw.groups, small.dw.in_channels, small.bn.num_features)
        assert small.dw.groups < 12


def test_a_masked_model_loads_back_with_its_masks_and_gates() -> None:
    make, model, batch = _pruned("resnet20", passes=1)
    state = _through_file(nnrelief.state_dict(model))
    fresh = nnrelief.load_state_dict(make().eval(), state)
    assert torch.equal(_outputs(fresh, batch), _outputs(model, batch))
    own, back = dict(model.named_modules()), dict(fresh.named_modules())
    masked = [name for name, module in own.items() if is_masked(module)]
    gated = [name for name, module in own.items() if gate_of(module) is not None]
    assert masked and gated, "test needs masks and shortcut gates"
    assert all(torch.equal(current_mask(back[name]), current_mask(own[name])) for name in masked)
    assert all(torch.equal(gate_of(back[name]), gate_of(own[name])) for name in gated)


def test_an_index_map_graph_module_is_refused_naming_what_to_use() -> None:
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match=r"torch.fx GraphModule, not your model's class.*compact -o small.pt2"):
        nnrelief.state_dict(traced)


def _snapshot(model: nn.Module) -> tuple[Any, ...]:
    modules = [(name, type(m).__name__, getattr(m, "in_channels", None), getattr(m, "out_channels", None))
               for name, m in model.named_modules()]  # fmt: skip
    return modules, {key: value.clone() for key, value in model.state_dict().items()}


def _unchanged(model: nn.Module, before: tuple[Any, ...]) -> bool:
    modules, state = _snapshot(model)
    return modules == before[0] and state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, Any]:
    _, model, batch = _pruned("resnet20")
    return _through_file(nnrelief.state_dict(nnrelief.compact(model, batch[:2])))


def test_a_state_of_another_architecture_is_refused_and_the_model_left_unchanged(resnet_state: dict[str, Any]) -> None:
    deeper = get_model("resnet32", 10)  # the same class: the index maps and attributes fit, then its extra blocks do not
    before = _snapshot(deeper)
    with pytest.raises(ValueError, match=r"does not fit ResNetCifar \(model left unchanged\).*keys missing") as error:
        nnrelief.load_state_dict(deeper, resnet_state)
    assert "layer1.3.conv1.weight" in str(error.value)
    assert _unchanged(deeper, before) and not any(isinstance(m, ChannelMap) for m in deeper.modules())
    cnn = SmallCNN()
    before = _snapshot(cnn)
    with pytest.raises(ValueError, match=r"state is of class nnrelief.models.resnet_cifar.ResNetCifar, the model given is .*SmallCNN"):
        nnrelief.load_state_dict(cnn, resnet_state)
    assert _unchanged(cnn, before)


def test_a_wider_tensor_or_a_plain_state_dict_is_refused() -> None:
    narrow, wide = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 6))
    state = nnrelief.state_dict(wide)
    before = _snapshot(narrow)
    with pytest.raises(ValueError, match=r"other shapes.*0.weight: state \(6, 4\), model \(3, 4\)"):
        nnrelief.load_state_dict(narrow, state)
    assert _unchanged(narrow, before)
    with pytest.raises(ValueError, match="not an nnrelief.state_dict.*restore_masks"):
        nnrelief.load_state_dict(narrow, wide.state_dict())
    with pytest.raises(ValueError, match="damaged: its entry '0.bias' is not a tensor"):
        nnrelief.load_state_dict(narrow, {**state, "state": {**state["state"], "0.bias": "x"}})
    with pytest.raises(ValueError, match="damaged: a channel map entry is {'path': '0'}"):
        nnrelief.load_state_dict(narrow, {**state, "channel_maps": [{"path": "0"}]})
    assert _unchanged(narrow, before)
