"""Every tensor nnrelief creates follows the device and dtype of the model's weights.

The CPU guard of the class of bug seen on CUDA (a gate buffer made on the CPU in float32):
a float64 model must stay float64 through pruning and compaction, with the same outputs.
"""

import pytest
import torch

import nnrelief
from nnrelief.compaction import compact
from nnrelief.models import IMAGE_MODELS, INPUT_SHAPES, get_model
from nnrelief.pruning.masks import GATE, restore_masks


def floating_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t for name, t in named.items() if t.is_floating_point()}


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
def test_float64_model_stays_float64_through_prune_and_compact(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, 10).double()
    x = torch.rand(3, *INPUT_SHAPES[name], dtype=torch.float64)
    nnrelief.prune(model, [x[:2], x[2:]], alpha_fc=0.9, alpha_conv=0.9, score="paper", progress=False)
    nnrelief.prune(model, [x], alpha_fc=0.9, alpha_conv=0.9, score="authors", progress=False)
    model.eval()
    out = model(x)
    wrong = {k: t.dtype for k, t in floating_tensors(model).items() if t.dtype != torch.float64}
    assert out.dtype == torch.float64 and not wrong
    small = compact(model, x)
    wrong = {k: t.dtype for k, t in floating_tensors(small).items() if t.dtype != torch.float64}
    assert not wrong
    out_small = small(x)
    assert out_small.dtype == torch.float64
    scale = out.abs().max().clamp_min(1.0)
    assert (out_small - out).abs().max() <= 1e-9 * scale


def test_restored_gates_follow_the_model_dtype() -> None:
    torch.manual_seed(0)
    model = get_model("resnet20", 10)
    x = torch.rand(4, 3, 32, 32)
    nnrelief.prune(model, [x], alpha_fc=0.9, alpha_conv=0.99, progress=False)
    state = model.state_dict()  # float32, as a run folder stores it
    assert any(key.endswith(GATE) for key in state)
    fresh = get_model("resnet20", 10).double()
    restore_masks(fresh, state)
    assert not {k: t.dtype for k, t in floating_tensors(fresh).items() if t.dtype != torch.float64}
    fresh.eval(), model.eval()
    assert torch.allclose(fresh(x.double()), model(x).double(), rtol=1e-4, atol=1e-5)
