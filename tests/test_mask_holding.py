"""Masks of a byte, pruned weights zeroed in place: what keeps them at zero through training
(every torch.optim optimizer, momentum gathered before the pass, gradient clipping, bf16,
torch.compile, DDP), the plain forward, and state dicts in the user's own class and format
(Hugging Face included), today's and earlier nnrelief files."""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune

import nnrelief
from nnrelief.models import lenet5
from nnrelief.pruning.masks import current_mask, hold_masks, is_masked, restore_masks, set_mask, state_with_masks
from nnrelief.training.checkpoint import _in_current_order


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _batches(count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=generator), torch.randint(0, 4, (8,), generator=generator)) for _ in range(count)]


def _pruned_zero(model: nn.Module) -> bool:
    masked = [(m, n) for m in model.modules() for n in ("weight", "bias") if is_masked(m, n)]
    assert masked, "nothing is masked"
    return all(not getattr(m, n).detach()[~current_mask(m, n)].any() for m, n in masked)


def _dense_optimizers() -> list[type[torch.optim.Optimizer]]:
    """Every torch.optim optimizer of this torch version that takes dense parameters."""
    found = [cls for _, cls in inspect.getmembers(torch.optim, inspect.isclass)
             if issubclass(cls, torch.optim.Optimizer) and cls not in (torch.optim.Optimizer, torch.optim.SparseAdam)]  # fmt: skip
    assert len(found) >= 12
    return found


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)


@pytest.mark.parametrize("optimizer_class", _dense_optimizers(), ids=lambda cls: cls.__name__)
def test_masks_hold_under_every_optimizer_with_state_from_before_the_pass(optimizer_class):
    model = _net()
    kwargs = {"momentum": 0.9, "weight_decay": 1e-2} if optimizer_class is torch.optim.SGD else {}
    matrices_only = optimizer_class.__name__ == "Muon"  # orthogonalised updates: 2-D parameters only
    params = [p for p in model.parameters() if p.dim() == 2 or not matrices_only]
    optimizer = optimizer_class(params, lr=0.05, **kwargs)
    batches = _batches()
    for x, y in batches:  # momentum, moments and histories filled before pruning
        _step(model, optimizer, x, y)
    nnrelief.prune(model, [x for x, _ in batches], alpha_fc=0.7, progress=False)
    masks = {name: mask.clone() for name, mask in state_with_masks(model).items() if name.endswith("_mask")}
    before = model[0].weight.detach().clone()
    for x, y in batches:
        _step(model, optimizer, x, y)
    assert _pruned_zero(model)
    assert all(torch.equal(mask, state_with_masks(model)[name]) for name, mask in masks.items())
    assert not torch.equal(model[0].weight.detach(), before)  # it did train


def test_gradients_of_pruned_entries_are_zero_before_clipping():
    model = _net()
    nnrelief.prune(model, [x for x, _ in _batches()], alpha_fc=0.7, progress=False)
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    mask = current_mask(model[0])
    assert not model[0].weight.grad[~mask].any() and model[0].weight.grad[mask].any()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert float(norm) == pytest.approx(float(expected))
    torch.optim.SGD(model.parameters(), lr=10.0, momentum=0.9).step()
    assert _pruned_zero(model)


def test_the_pruned_model_runs_the_plain_forward_and_its_state_dict_is_the_plain_one():
    model = _net()
    nnrelief.prune(model, [x for x, _ in _batches()], alpha_fc=0.7, progress=False)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(isinstance(m.weight, nn.Parameter) for m in model if isinstance(m, nn.Linear))
    assert model.state_dict().keys() == _net().state_dict().keys()
    fresh = _net()
    fresh.load_state_dict(model.state_dict(), strict=True)  # the user's own class, plainly
    x = _batches(1)[0][0]
    assert torch.equal(fresh(x), model(x))
    mask_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("_mask"))
    assert mask_bytes == sum(m.weight.numel() + m.bias.numel() for m in model if isinstance(m, nn.Linear))  # one byte each


def test_bf16_weights_stay_masked_under_adam():
    model = _net().to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in _batches()]
    nnrelief.prune(model, [x for x, _ in batches], alpha_fc=0.7, progress=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in batches:
        _step(model, optimizer, x, y)
    assert model[0].weight.dtype == torch.bfloat16 and _pruned_zero(model)


def test_autocast_with_a_grad_scaler_keeps_the_masks():
    model = _net()
    nnrelief.prune(model, [x for x, _ in _batches()], alpha_fc=0.7, progress=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    for x, y in _batches():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert _pruned_zero(model)


def test_a_compiled_training_step_keeps_the_masks():
    model = _net()
    nnrelief.prune(model, [x for x, _ in _batches()], alpha_fc=0.7, progress=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    compiled = torch.compile(model, backend="eager")
    step = torch.compile(optimizer.step, backend="eager")
    for x, y in _batches():
        optimizer.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        step()
    assert _pruned_zero(model)


def test_a_copy_carries_the_masks_and_holds_them_once_asked():
    model = _net()
    nnrelief.prune(model, [x for x, _ in _batches()], alpha_fc=0.7, progress=False)
    twin = copy.deepcopy(model)
    assert torch.equal(current_mask(twin[0]), current_mask(model[0]))
    hold_masks(twin)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for x, y in _batches():
        _step(twin, optimizer, x, y)
    assert _pruned_zero(twin)


def test_restore_infers_masks_from_the_zeros_of_a_plain_state_dict():
    model = lenet5()
    nnrelief.prune(model, [torch.rand(16, 1, 28, 28)], alpha_fc=0.8, alpha_conv=0.8, progress=False)
    fresh = lenet5()
    restore_masks(fresh, model.state_dict())
    for (name, a), (_, b) in zip(model.named_modules(), fresh.named_modules()):
        if isinstance(a, (nn.Linear, nn.Conv2d)):
            assert torch.equal(current_mask(a), current_mask(b)), name
    dense = lenet5()
    restore_masks(dense, lenet5().state_dict())
    assert not any(is_masked(m) for m in dense.modules())  # no zeros: no masks


def test_files_of_the_earlier_format_load_with_their_masks():
    torch.manual_seed(3)
    earlier = _net()  # as nnrelief wrote them before: torch.nn.utils.prune's reparametrisation
    keep = torch.rand(16, 12) > 0.5
    torch_prune.custom_from_mask(earlier[0], "weight", keep.float())
    torch_prune.custom_from_mask(earlier[0], "bias", (torch.arange(16) % 3 > 0).float())
    state = earlier.state_dict()
    assert "0.weight_orig" in state and "0.weight_mask" in state
    fresh = _net()
    restore_masks(fresh, state)
    assert torch.equal(current_mask(fresh[0]), keep)
    x = _batches(1)[0][0]
    assert torch.equal(fresh(x), earlier(x))


def test_optimizer_state_of_an_earlier_checkpoint_maps_onto_todays_parameter_order():
    earlier = _net()
    torch_prune.custom_from_mask(earlier[0], "weight", torch.ones(16, 12))  # weight_orig moves after bias
    optimizer = torch.optim.SGD(earlier.parameters(), lr=0.1, momentum=0.9)
    _step(earlier, optimizer, *_batches(1)[0])
    saved = optimizer.state_dict()
    order = [name for name, _ in earlier.named_parameters()]
    assert order[:2] == ["0.bias", "0.weight_orig"]
    model = _net()
    mapped = _in_current_order(saved, earlier.state_dict(), model)
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(mapped)
    momentum = {name: fresh.state[param]["momentum_buffer"] for name, param in model.named_parameters()}
    assert torch.equal(momentum["0.weight"], optimizer.state[earlier[0].weight_orig]["momentum_buffer"])
    assert torch.equal(momentum["0.bias"], optimizer.state[earlier[0].bias]["momentum_buffer"])


def test_hugging_face_save_and_from_pretrained_keep_the_zeros(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    nnrelief.prune(model, [{"input_ids": ids}], alpha_fc=0.8, progress=False)
    zeros = {name: int((p == 0).sum()) for name, p in model.named_parameters()}
    model.save_pretrained(tmp_path)
    back, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert {name: int((p == 0).sum()) for name, p in back.named_parameters()} == zeros
    assert torch.equal(back.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    restore_masks(back, back.state_dict())
    proj = back.model.layers[0].mlp.down_proj
    assert torch.equal(current_mask(proj), current_mask(model.model.layers[0].mlp.down_proj))


def _ddp_worker(rank: int, world: int, port: int, result: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _net()
        set_mask(model[0], "weight", torch.arange(16 * 12).view(16, 12) % 3 > 0)
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
        for x, y in _batches()[rank::world]:
            _step(ddp, optimizer, x, y)
        result[rank] = (_pruned_zero(model), model[0].weight.detach().clone())
    finally:
        dist.destroy_process_group()


def test_masks_hold_under_ddp():
    result = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, 29400 + os.getpid() % 500, result), nprocs=2, join=True)
    assert result[0][0] and result[1][0]
    assert torch.equal(result[0][1], result[1][1])  # ranks agree


def test_a_run_folder_of_the_earlier_format_evaluates_as_it_recorded(shared_data_dir, capsys):
    from nnrelief.cli import main
    from nnrelief.experiments.experiment import load_weights

    run = Path(__file__).resolve().parents[1] / "docs" / "results" / "in-progress" / "lenet5-mnist-paper"
    model, _ = load_weights(run / "model-iter10.pt")  # torch.nn.utils.prune's weight_orig / float weight_mask
    assert sum(int(current_mask(m, name).sum()) for m in model.modules() for name in ("weight", "bias") if is_masked(m, name)) == 4161
    assert main(["eval", str(run / "model-iter10.pt"), "--data-dir", str(shared_data_dir), "-q"]) == 0
    assert "accuracy: 99.02%" in capsys.readouterr().out  # history.json: iteration 10, test 0.9902


def test_a_first_mask_is_the_planners_own_tensor_for_a_linear_and_a_transposed_conv1d(monkeypatch):
    """No copy of the planner's keep mask: GPT-2's Conv1D stores its weight (in, out), and
    its mask is built in that layout, so it is adopted as the mask buffer like a Linear's."""
    from transformers.pytorch_utils import Conv1D

    from nnrelief.pruning.plan import Planner

    built = {}
    selected = Planner._selected

    def recording(self, name, alpha):
        mask = selected(self, name, alpha)
        built[name] = mask.weight
        return mask

    monkeypatch.setattr(Planner, "_selected", recording)
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 6), nn.ReLU(), nn.Linear(8, 4))
    nnrelief.prune(model, [torch.randn(32, 6)], alpha_fc=0.9, progress=False)
    for name in ("0", "2"):
        mask = model.get_submodule(name).weight_mask
        assert not bool(mask.all())
        assert mask.untyped_storage().data_ptr() == built[name].untyped_storage().data_ptr()
