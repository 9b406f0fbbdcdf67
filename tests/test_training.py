"""Tests for nnrelief.training (tiny MLP on synthetic blobs; the whole file runs in seconds)."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from nnrelief.pruning.masks import set_mask
from nnrelief.training import (
    EpochRecord,
    TrainConfig,
    TrainingDivergedError,
    evaluate,
    fit,
    make_optimizer,
    make_scheduler,
    resolve_device,
    seed_everything,
    train_epoch,
)

N_FEATURES, N_CLASSES = 8, 4


def make_blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four well separated Gaussian blobs (same centres for every seed)."""
    centres = 3 * torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    x = centres[y] + torch.randn(n, N_FEATURES, generator=g)
    return x, y


class Batches:
    """Minimal loader: shuffles by (seed, epoch) via set_epoch, or with the global torch RNG."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int | None = 0
    ) -> None:
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.epoch = 0
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs_seen.append(epoch)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.seed is None:
            order = torch.randperm(len(self.y))
        else:
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(len(self.y), generator=g)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]


class GlobalRngBatches(Batches):
    """Shuffles with the global torch RNG and has no set_epoch (like a plain DataLoader)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        super().__init__(x, y, batch_size, seed=None)

    set_epoch = None  # type: ignore[assignment]


def make_model(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(N_FEATURES, 32),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(32, N_CLASSES),
    )


@pytest.fixture(scope="module")
def data() -> tuple[Batches, Batches]:
    x, y = make_blobs(256, seed=1)
    xv, yv = make_blobs(128, seed=2)
    return Batches(x, y, 32), Batches(xv, yv, 64, seed=None)


def cpu_cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(optimizer="sgd", lr=0.05, epochs=3, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- config


def test_config_json_roundtrip_and_validation() -> None:
    cfg = TrainConfig(optimizer="SGD", lr=0.1, milestones=[80, 120], grad_clip=5.0, seed=3)
    assert cfg.optimizer == "sgd" and cfg.momentum == 0.9
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({**cfg.to_dict(), "batch": 3})
    for bad in (
        {"optimizer": "rmsprop"},
        {"lr": 0.0},
        {"epochs": 0},
        {"milestones": [0]},
        {"device": "gpu"},
        {"grad_clip": 0.0},
        {"label_smoothing": 1.0},
        {"amp": "int8"},
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"momentum": float("nan")},
        {"weight_decay": float("inf")},
        {"gamma": float("nan")},
        {"grad_clip": float("inf")},
    ):
        with pytest.raises(ValueError):
            TrainConfig(**bad)  # type: ignore[arg-type]


def test_amp_modes_and_the_old_boolean() -> None:
    assert TrainConfig().amp == "off"
    assert TrainConfig(amp="bf16").amp == "bf16"
    assert TrainConfig(amp=True).amp == "fp16"  # type: ignore[arg-type]
    assert TrainConfig.from_dict({"amp": False}).amp == "off"
    with pytest.raises(ValueError, match=r"amp must be one of \('off', 'bf16', 'fp16'\)"):
        TrainConfig(amp="fp8")


def test_make_optimizer_and_scheduler() -> None:
    model = make_model()
    sgd = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(make_optimizer(model, TrainConfig(optimizer="adam")), torch.optim.Adam)
    assert isinstance(make_optimizer(model, TrainConfig(optimizer="adamw")), torch.optim.AdamW)
    sched = make_scheduler(sgd, TrainConfig(optimizer="sgd", lr=0.1, milestones=[2, 1], gamma=0.5))
    lrs = []
    for _ in range(3):
        lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.05, 0.025])


def test_cosine_schedule_follows_the_formula() -> None:
    sgd = make_optimizer(make_model(), TrainConfig(optimizer="sgd", lr=0.1))
    sched = make_scheduler(sgd, TrainConfig(optimizer="sgd", lr=0.1, epochs=4, lr_schedule="cosine"))
    lrs = []
    for _ in range(4):
        lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


# ----------------------------------------------------------------------------- device


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_fit_with_cuda_config_fails_clearly_without_cuda(
    monkeypatch: pytest.MonkeyPatch, data: tuple[Batches, Batches]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        fit(make_model(), *data, cpu_cfg(device="cuda"), progress=False)


def test_amp_is_not_used_on_cpu(
    monkeypatch: pytest.MonkeyPatch, data: tuple[Batches, Batches]
) -> None:
    plain = make_model()
    fit(plain, *data, cpu_cfg(epochs=2), progress=False)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("AMP machinery used on CPU")

    monkeypatch.setattr(torch, "autocast", forbidden)
    monkeypatch.setattr(torch.amp, "GradScaler", forbidden)
    amp = make_model()
    fit(amp, *data, cpu_cfg(epochs=2, amp=True), progress=False)
    assert states_equal(plain.state_dict(), amp.state_dict())


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_restores_mode_and_counts(data: tuple[Batches, Batches]) -> None:
    _, val = data
    model = make_model(dropout=0.5)
    model.train()
    first = evaluate(model, val, "cpu")
    assert model.training
    assert first.n == 128 and 0.0 <= first.accuracy <= 1.0
    model.eval()
    second = evaluate(model, val, "cpu")
    assert not model.training
    # dropout off during evaluation (the loader's shuffling only reorders the sum)
    assert (first.accuracy, first.n) == (second.accuracy, second.n)
    assert first.loss == pytest.approx(second.loss, rel=1e-6)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, [], "cpu")


def test_evaluate_matches_manual_computation() -> None:
    x, y = make_blobs(50, seed=5)
    model = make_model()
    res = evaluate(model, [(x[:20], y[:20]), (x[20:], y[20:])], torch.device("cpu"))
    with torch.no_grad():
        out = model(x)
    assert res.loss == pytest.approx(nn.functional.cross_entropy(out, y).item(), rel=1e-6)
    assert res.accuracy == (out.argmax(1) == y).sum().item() / 50


def test_train_epoch_restores_mode_and_clips_gradients() -> None:
    x, y = make_blobs(64, seed=3)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    model = make_model()
    model.eval()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    res = train_epoch(model, batches, opt, "cpu", grad_clip=1e-3, progress=False)
    assert not model.training
    assert res.n == 64
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < step.item() <= 2 * 1e-3 * (1 + 1e-4)  # two steps of norm <= lr * clip


# ----------------------------------------------------------------------------- fit


def test_fit_learns_and_returns_best_weights(data: tuple[Batches, Batches]) -> None:
    train, val = data
    train.epochs_seen.clear()
    model = make_model()
    seen: list[EpochRecord] = []
    cfg = cpu_cfg(epochs=4, milestones=[3], label_smoothing=0.05, grad_clip=10.0)
    res = fit(model, train, val, cfg, progress=False, on_epoch_end=seen.append)
    assert seen == res.history and [r.epoch for r in res.history] == [1, 2, 3, 4]
    assert train.epochs_seen == [0, 1, 2, 3]
    assert [r.lr for r in res.history] == pytest.approx([0.05, 0.05, 0.05, 0.005])
    assert res.history[-1].train_loss < 0.5 * res.history[0].train_loss
    assert res.best_val_accuracy > 0.9  # chance is 0.25
    assert res.best_val_accuracy == max(r.val_accuracy for r in res.history)
    again = evaluate(model, val, "cpu")
    assert again.accuracy == res.best_val_accuracy
    # float32 kernels may pick other summation orders from call to call: not bitwise
    assert again.loss == pytest.approx(res.best_val_loss, rel=1e-5)
    assert model.training  # mode on entry


class ValOnlyRightOnce:
    """Validation set whose labels are correct only on the `good`-th pass (0-based)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, good: int) -> None:
        self.x, self.y, self.good, self.passes = x, y, good, 0

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        labels = self.y if self.passes == self.good else (self.y + 1) % N_CLASSES
        self.passes += 1
        yield self.x, labels


def test_fit_selects_best_validation_epoch(data: tuple[Batches, Batches]) -> None:
    train, _ = data
    xv, yv = make_blobs(128, seed=2)
    model = make_model()
    random_mask(model[0], "weight", amount=0.5)
    snapshots: list[dict[str, torch.Tensor]] = []

    def snapshot(_: EpochRecord) -> None:
        snapshots.append(copy.deepcopy(model.state_dict()))

    res = fit(
        model,
        train,
        ValOnlyRightOnce(xv, yv, good=1),
        cpu_cfg(epochs=4),
        progress=False,
        on_epoch_end=snapshot,
    )
    assert res.best_epoch == 2
    assert res.best_val_accuracy == res.history[1].val_accuracy > 0.9
    assert states_equal(model.state_dict(), snapshots[1])
    assert not states_equal(model.state_dict(), snapshots[-1])
    assert not model[0].weight[~model[0].weight_mask].any()  # the restored epoch's pruned entries are zero


def test_fit_logs_epochs_with_progress_enabled(
    data: tuple[Batches, Batches], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="nnrelief.training"):
        res = fit(make_model(), *data, cpu_cfg(epochs=2), progress=True)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("epoch ") for m in messages) == 2
    assert any(m.startswith(f"best epoch {res.best_epoch}") for m in messages)


def test_two_cpu_runs_are_identical() -> None:
    x, y = make_blobs(128, seed=1)
    xv, yv = make_blobs(64, seed=2)
    results, states = [], []
    for _ in range(2):
        model = make_model(dropout=0.3)
        torch.rand(7)  # disturb the global RNG: fit must reseed
        res = fit(
            model,
            GlobalRngBatches(x, y, 16),
            Batches(xv, yv, 64),
            cpu_cfg(optimizer="adam", lr=1e-2, epochs=2),
            progress=False,
        )
        results.append([(r.train_loss, r.val_loss) for r in res.history])
        states.append(model.state_dict())
    assert results[0] == results[1]
    assert states_equal(*states)


# ----------------------------------------------------------------------------- masks


def random_mask(layer: nn.Module, name: str, amount: float) -> None:
    """Prune a random ``amount`` of ``layer.<name>`` with nnrelief's masks."""
    tensor = getattr(layer, name)
    set_mask(layer, name, torch.rand(tensor.shape) >= amount)


@pytest.mark.parametrize(
    "opt_kw",
    [
        dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2),
        dict(optimizer="adam", lr=1e-2, weight_decay=1e-2),
        dict(optimizer="adamw", lr=1e-2, weight_decay=1e-1),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_masks_hold_during_training(opt_kw: dict, data: tuple[Batches, Batches]) -> None:
    train, val = data
    model = make_model()
    layer = model[0]
    torch.manual_seed(7)
    random_mask(layer, "weight", amount=0.6)
    random_mask(layer, "bias", amount=0.5)
    w_mask, b_mask = layer.weight_mask.clone(), layer.bias_mask.clone()
    before = layer.weight.detach().clone()
    assert isinstance(layer.weight, nn.Parameter) and not layer._forward_pre_hooks

    fit(model, train, val, cpu_cfg(epochs=2, **opt_kw), progress=False)

    assert torch.equal(layer.weight_mask, w_mask) and torch.equal(layer.bias_mask, b_mask)
    assert torch.all(layer.weight[~w_mask] == 0) and torch.all(layer.bias[~b_mask] == 0)
    assert not torch.equal(layer.weight[w_mask], before[w_mask])  # training did happen
    with torch.no_grad():
        assert torch.all(model[0](torch.zeros(1, N_FEATURES))[0][~b_mask] == 0)


# ----------------------------------------------------------------------------- checkpoints


class Interrupted(Exception):
    pass


class InterruptAfter:
    """Wraps a loader and raises after `limit` batches in total (a crash mid-epoch)."""

    def __init__(self, inner: Batches, limit: int) -> None:
        self.inner, self.limit, self.count = inner, limit, 0

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        if callable(self.inner.set_epoch):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.inner:
            if self.count == self.limit:
                raise Interrupted
            self.count += 1
            yield batch


def pruned_model(model_seed: int, mask_seed: int) -> nn.Sequential:
    model = make_model(model_seed, dropout=0.2)
    torch.manual_seed(mask_seed)
    random_mask(model[0], "weight", amount=0.5)
    return model


@pytest.mark.parametrize("loader", ["set_epoch", "global_rng"])
def test_resume_equals_uninterrupted_run(tmp_path: Path, loader: str) -> None:
    x, y = make_blobs(96, seed=1)
    xv, yv = make_blobs(64, seed=2)

    def train_batches() -> Batches:
        return Batches(x, y, 16, seed=4) if loader == "set_epoch" else GlobalRngBatches(x, y, 16)

    val = Batches(xv, yv, 32)
    cfg = cpu_cfg(lr=0.05, weight_decay=1e-3, epochs=3, milestones=[2])

    straight = pruned_model(0, 1)
    ref = fit(straight, train_batches(), val, cfg, checkpoint_path=tmp_path / "a.pt",
              progress=False)

    ckpt = tmp_path / "sub" / "b.pt"
    interrupted = InterruptAfter(train_batches(), limit=2 * 6 + 3)  # 6 batches per epoch
    with pytest.raises(Interrupted):
        fit(pruned_model(0, 1), interrupted, val, cfg, checkpoint_path=ckpt, progress=False)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    assert [p.name for p in ckpt.parent.iterdir()] == ["b.pt"]  # no temp files left

    torch.rand(11)  # the resumed run must not depend on the RNG state it starts with
    resumed = pruned_model(5, 6)  # different init and mask: everything comes from the file
    res = fit(resumed, train_batches(), val, cfg, checkpoint_path=ckpt, progress=False)

    assert res.resumed_from == 2 and ref.resumed_from == 0
    assert states_equal(straight.state_dict(), resumed.state_dict())
    assert torch.equal(straight[0].weight, resumed[0].weight)

    def losses(h: list[EpochRecord]) -> list[tuple[float, ...]]:
        return [
            (r.epoch, r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy, r.lr) for r in h
        ]

    assert losses(res.history) == losses(ref.history)
    assert (res.best_epoch, res.best_val_accuracy) == (ref.best_epoch, ref.best_val_accuracy)


def test_checkpoint_config_mismatch_and_extension(
    tmp_path: Path, data: tuple[Batches, Batches]
) -> None:
    ckpt = tmp_path / "run.pt"
    cfg = cpu_cfg(epochs=1)
    fit(make_model(), *data, cfg, checkpoint_path=ckpt, progress=False)

    with pytest.raises(ValueError, match=r"different TrainConfig \(lr: checkpoint=0.05 now=0.02\)"):
        fit(make_model(), *data, cpu_cfg(epochs=1, lr=0.02), checkpoint_path=ckpt, progress=False)

    done = fit(make_model(), *data, cfg, checkpoint_path=ckpt, progress=False)
    assert done.resumed_from == 1 and len(done.history) == 1

    longer = fit(make_model(), *data, cpu_cfg(epochs=2), checkpoint_path=ckpt, progress=False)
    assert longer.resumed_from == 1 and [r.epoch for r in longer.history] == [1, 2]
    with pytest.raises(ValueError, match="more than cfg.epochs=1"):
        fit(make_model(), *data, cfg, checkpoint_path=ckpt, progress=False)

    other = tmp_path / "other.pt"
    torch.save(make_model().state_dict(), other)
    with pytest.raises(ValueError, match="not a nnrelief training checkpoint"):
        fit(make_model(), *data, cfg, checkpoint_path=other, progress=False)


def _edit_checkpoint(path: Path, edit) -> None:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def test_checkpoint_from_before_amp_modes_resumes(tmp_path: Path, data: tuple[Batches, Batches]) -> None:
    ckpt = tmp_path / "old.pt"
    fit(make_model(), *data, cpu_cfg(epochs=1), checkpoint_path=ckpt, progress=False)

    def make_old(c: dict) -> None:  # how the first release wrote its config
        c["config"]["amp"] = False
        del c["config"]["compile"]

    _edit_checkpoint(ckpt, make_old)
    res = fit(make_model(), *data, cpu_cfg(epochs=2), checkpoint_path=ckpt, progress=False)
    assert res.resumed_from == 1 and len(res.history) == 2
    with pytest.raises(ValueError, match="amp: checkpoint='off' now='bf16'"):
        fit(make_model(), *data, cpu_cfg(epochs=2, amp="bf16"), checkpoint_path=ckpt, progress=False)


def test_checkpoint_of_a_fused_gpu_optimizer_resumes_on_cpu(tmp_path: Path) -> None:
    """A CUDA run's Adam is fused; its checkpoint (read with map_location='cpu') must resume
    with this machine's implementation and give the uninterrupted CPU run."""
    x, y = make_blobs(96, seed=1)
    val = Batches(*make_blobs(64, seed=2), 32)
    cfg = cpu_cfg(optimizer="adam", lr=0.01, epochs=3)
    straight = pruned_model(0, 1)
    fit(straight, Batches(x, y, 16, seed=4), val, cfg, progress=False)

    ckpt = tmp_path / "gpu.pt"
    interrupted = InterruptAfter(Batches(x, y, 16, seed=4), limit=6 + 2)
    with pytest.raises(Interrupted):
        fit(pruned_model(0, 1), interrupted, val, cfg, checkpoint_path=ckpt, progress=False)

    def as_written_on_gpu(c: dict) -> None:
        c["config"]["device"] = "cuda:0"
        for group in c["optimizer"]["param_groups"]:
            group.update(fused=True, foreach=None)

    _edit_checkpoint(ckpt, as_written_on_gpu)
    resumed = pruned_model(5, 6)
    fit(resumed, Batches(x, y, 16, seed=4), val, cfg, checkpoint_path=ckpt, progress=False)
    assert states_equal(straight.state_dict(), resumed.state_dict())


class PoisonEpoch(Batches):
    """Training batches whose inputs are NaN from epoch ``bad`` (0-based) on."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bad: int) -> None:
        super().__init__(x, y, 32, seed=0)
        self.bad = bad
        self.batches_seen = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in super().__iter__():
            self.batches_seen += 1
            yield (xb * float("nan") if self.epoch >= self.bad else xb), yb


@pytest.mark.parametrize("bad_epoch", [0, 1])
def test_diverged_training_stops_and_keeps_last_good_weights(
    tmp_path: Path, data: tuple[Batches, Batches], bad_epoch: int
) -> None:
    x, y = make_blobs(256, seed=1)
    _, val = data
    good = make_model()
    fit(good, Batches(x, y, 32), val, cpu_cfg(epochs=1), progress=False)
    model, entry = make_model(), make_model().state_dict()
    ckpt = tmp_path / "run.pt"
    batches = PoisonEpoch(x, y, bad_epoch)
    with pytest.raises(TrainingDivergedError, match=rf"retraining 2: .*nan in epoch {bad_epoch + 1}/3"):
        fit(model, batches, val, cpu_cfg(epochs=3), checkpoint_path=ckpt, progress=False, desc="retraining 2")
    assert batches.batches_seen == (bad_epoch + 1) * len(batches)  # stopped after the bad epoch
    assert states_equal(model.state_dict(), good.state_dict() if bad_epoch else entry)
    if bad_epoch:
        assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    else:
        assert not ckpt.exists()
    assert isinstance(TrainingDivergedError("x"), ValueError)


def test_compile_runs_the_compiled_model(
    monkeypatch: pytest.MonkeyPatch, data: tuple[Batches, Batches]
) -> None:
    compiled: list[nn.Module] = []

    class Wrapper(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.inner(x)

    def fake_compile(model: nn.Module) -> nn.Module:
        compiled.append(Wrapper(model))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    plain, wrapped = make_model(), make_model()
    fit(plain, *data, cpu_cfg(epochs=1), progress=False)
    fit(wrapped, *data, cpu_cfg(epochs=1, compile=True), progress=False)
    train, val = data
    assert len(compiled) == 1 and compiled[0].inner is wrapped
    assert compiled[0].calls == len(train) + len(val)
    assert states_equal(plain.state_dict(), wrapped.state_dict())


def test_seed_everything_is_reproducible() -> None:
    import random

    import numpy as np

    seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


def test_fit_sets_flush_denormal(
    monkeypatch: pytest.MonkeyPatch, data: tuple[Batches, Batches]
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: calls.append(on) or True)
    fit(make_model(), *data, cpu_cfg(epochs=1), progress=False)
    assert calls == [True]
