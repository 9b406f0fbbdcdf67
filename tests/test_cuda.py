"""GPU tests (``pytest -m cuda``); every test here is skipped on a machine without CUDA.

What they guard: nnrelief on CUDA works for every zoo model (prune -> forward -> bf16
training step -> compact), gives the CPU's masks up to float rounding near the alpha
threshold, resumes runs across devices, and never synchronises the host in the per-batch
loops of the pruning pass and of training.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import nnrelief
from nnrelief import data as nndata
from nnrelief.analysis import analyse
from nnrelief.compaction import compact
from nnrelief.experiments.config import ExperimentConfig
from nnrelief.experiments.experiment import Experiment
from nnrelief.inputs import ModelInput
from nnrelief.models import IMAGE_MODELS, INPUT_SHAPES, get_model
from nnrelief.pruning.batches import PruningBatches
from nnrelief.pruning.masks import current_mask
from nnrelief.pruning.stats import collect
from nnrelief.training import TrainConfig, fit, make_optimizer, train_epoch
from nnrelief.training.loops import _train_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
MASK_DIFFERENCE_LIMIT = 0.0005  # fraction of weights whose keep decision may differ


@pytest.fixture
def exact_fp32():
    """Full float32 convolutions and matmuls (no TF32) while comparing outputs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def floating_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t for name, t in named.items() if t.is_floating_point()}


def assert_all_on_cuda_float32(model: torch.nn.Module) -> None:
    wrong = {k: (t.device, t.dtype) for k, t in floating_tensors(model).items() if not t.is_cuda or t.dtype != torch.float32}
    assert not wrong


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
def test_zoo_model_prune_train_compact_on_gpu(name: str, exact_fp32) -> None:
    torch.manual_seed(0)
    model = get_model(name, 10).to(CUDA)
    x = torch.rand(16, *INPUT_SHAPES[name], device=CUDA)
    y = torch.randint(0, 10, (16,), device=CUDA)
    nnrelief.prune(model, [x[:8], (x[8:], y[8:])], alpha_fc=0.9, alpha_conv=0.9, progress=False)
    assert_all_on_cuda_float32(model)
    assert torch.isfinite(model.eval()(x)).all()

    optimizer = make_optimizer(model, TrainConfig(device="cuda", amp="bf16"))
    result = train_epoch(model, [(x, y)], optimizer, CUDA, amp="bf16", progress=False)
    assert result.n == 16 and torch.isfinite(torch.tensor(result.loss))
    for module in model.modules():
        if hasattr(module, "weight_mask"):
            assert not module.weight[~current_mask(module)].any()  # masks hold through the step
    assert_all_on_cuda_float32(model)

    model.eval()
    out = model(x)
    small = compact(model, x)
    assert_all_on_cuda_float32(small)
    out_small = small(x)
    scale = out.abs().max().clamp_min(1.0)
    assert (out_small - out).abs().max() <= 1e-4 * scale


def _cifar_or_random(samples: int) -> torch.Tensor:
    """Real CIFAR-10 training images when $NNRELIEF_SHARED_DATA holds them, else noise."""
    root = os.environ.get("NNRELIEF_SHARED_DATA")
    if root and (Path(root) / "cifar-10-batches-py").is_dir():
        train = nndata.load_dataset("cifar10", root, split="train", download=False)
        images = nndata.sample_pruning_set(train, samples, seed=0).images
        return nndata.default_normalize("cifar10")(images.float())
    return torch.rand(samples, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["lenet5", "vgg_like", "resnet20"])
def test_cpu_and_gpu_masks_agree_up_to_rounding(name: str) -> None:
    """The same model and data give the same masks on CPU and GPU, except for weights whose
    score lies within float rounding of the alpha threshold (docs/GPU.md explains why)."""
    torch.manual_seed(0)
    model = get_model(name, 10).eval()
    if INPUT_SHAPES[name] == (3, 32, 32):
        x = _cifar_or_random(300)
    else:
        x = torch.rand(300, *INPUT_SHAPES[name], generator=torch.Generator().manual_seed(0))
    on_cpu, on_gpu = copy.deepcopy(model), copy.deepcopy(model).to(CUDA)
    nnrelief.prune(on_cpu, list(x.split(100)), progress=False)
    nnrelief.prune(on_gpu, list(x.to(CUDA).split(100)), progress=False)
    gpu_modules = dict(on_gpu.named_modules())
    differ = total = 0
    for module_name, module in on_cpu.named_modules():
        if hasattr(module, "weight_mask"):
            cpu_mask = current_mask(module)
            gpu_mask = current_mask(gpu_modules[module_name]).cpu()
            differ += int((cpu_mask != gpu_mask).sum())
            total += cpu_mask.numel()
    assert total > 0
    assert differ / total < MASK_DIFFERENCE_LIMIT, f"{differ} of {total} weights differ"


def test_pruning_pass_loop_never_synchronises() -> None:
    """The per-batch loop of a pass (input checks, observers, paper conv score) runs with
    CUDA sync debugging set to 'error'."""
    torch.manual_seed(0)
    model = get_model("resnet20", 10).to(CUDA).eval()
    x = torch.rand(64, 3, 32, 32, device=CUDA)
    graph = analyse(model, ModelInput((x[:32],)))
    inputs = PruningBatches([x[:32], (x[32:], None)], CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = collect(graph, iter(inputs), "paper", model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    inputs.check_finite()
    assert all(t.is_cuda for entry in stats.values() for t in entry.values())


def test_loader_batches_never_synchronise() -> None:
    """On-device uint8 data with batched crop/flip augmentation: no host wait per batch."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=generator)
    dataset = nndata.TensorDataset(images, torch.randint(0, 10, (256,), generator=generator), 10, "cifar10")
    loader = nndata.BatchLoader(dataset, 64, shuffle=True, seed=0, device=CUDA, augment=True)
    list(loader)  # warm-up: pinned-memory pool, normalisation constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == 4 and all(x.is_cuda and y.is_cuda for x, y in batches)


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_training_step_never_synchronises(amp: str) -> None:
    torch.manual_seed(0)
    model = get_model("vgg_like", 10).to(CUDA).to(memory_format=torch.channels_last)
    nnrelief.prune(model, [torch.rand(32, 3, 32, 32, device=CUDA)], progress=False)
    optimizer = make_optimizer(model, TrainConfig(device="cuda", amp=amp))
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    x = torch.rand(32, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device=CUDA)
    model.train()
    _train_step(model, optimizer, x, y, CUDA, amp, scaler, 1.0, 0.1)  # warm-up: cuDNN plans, state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _train_step(model, optimizer, x, y, CUDA, amp, scaler, 1.0, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _Interrupted(Exception):
    pass


class _Batches:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, limit: int | None = None) -> None:
        self.x, self.y, self.limit, self.seen, self.epoch = x, y, limit, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.y) // 32

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.epoch))
        for i in range(len(self)):
            if self.limit is not None and self.seen == self.limit:
                raise _Interrupted
            self.seen += 1
            index = order[i * 32 : (i + 1) * 32]
            yield self.x[index], self.y[index]


@pytest.mark.parametrize("first,second", [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
def test_training_resumes_across_devices(tmp_path: Path, first: str, second: str) -> None:
    """A fit interrupted on one device resumes from its checkpoint on the other (or the same)."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 3, 32, 32, generator=generator), torch.randint(0, 10, (256,), generator=generator)
    val = _Batches(x[:64], y[:64])
    cfg = {"optimizer": "adam", "lr": 1e-3, "epochs": 3, "amp": "bf16", "seed": 1}
    ckpt = tmp_path / "fit.ckpt"
    torch.manual_seed(0)
    model = get_model("resnet20", 10)
    with pytest.raises(_Interrupted):
        fit(model, _Batches(x, y, limit=8 + 3), val, TrainConfig(device=first, **cfg), checkpoint_path=ckpt, progress=False)
    resumed = get_model("resnet20", 10)
    result = fit(resumed, _Batches(x, y), val, TrainConfig(device=second, **cfg), checkpoint_path=ckpt, progress=False)
    assert result.resumed_from == 1 and [r.epoch for r in result.history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in result.history)
    assert all(t.device.type == second for t in floating_tensors(resumed).values())


def _small_run(device: str, num_iters: int) -> ExperimentConfig:
    return ExperimentConfig(
        model="lenet300_100", dataset="mnist-sample", epochs=2, retrain_epochs=1, milestones=[],
        retrain_milestones=[], batch_size=100, train_subset=2000, val_size=500, prune_samples=500,
        num_iters=num_iters, device=device, amp="bf16",
    )  # fmt: skip


@pytest.mark.parametrize("first,second", [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
def test_run_folder_continues_across_devices(tmp_path: Path, first: str, second: str) -> None:
    """A run folder written on one device is extended by a run on the other (device is a
    free setting: same folder, same settings)."""
    run_dir = tmp_path / "run"
    history = Experiment(_small_run(first, 1), run_dir, progress=False).run()
    assert [r.iteration for r in history.records] == [0, 1]
    extended = Experiment(_small_run(second, 2), run_dir, progress=False).run()
    assert [r.iteration for r in extended.records] == [0, 1, 2]
    assert extended.records[1].params_remaining == history.records[1].params_remaining
    assert extended.records[2].params_remaining < extended.records[1].params_remaining
