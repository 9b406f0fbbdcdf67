"""Training and evaluation loops for dense and pruned models.

Design points:

* The data are any iterable of ``(x, y)`` tensor batches with ``len()``. When the object
  has a ``set_epoch(epoch)`` method it is called (with the 0-based epoch index) before each
  pass over it, so shuffling can depend only on ``(seed, epoch)``.
* Pruned models use ``torch.nn.utils.prune``-style reparametrisation
  (``weight_orig`` parameter times ``weight_mask`` buffer, recomputed by a forward
  pre-hook). Training ``model.parameters()`` normally keeps masked weights at exactly zero,
  whatever the optimizer's momentum or weight decay does to ``weight_orig``.
* :func:`fit` selects the best epoch on a *validation* split (never the test set), can
  write an atomic checkpoint after every epoch and resume from it bit-exactly on CPU.
* Mixed precision (``torch.autocast`` + ``GradScaler``) is used only on CUDA with
  ``TrainConfig.amp``; the CPU path never touches it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from tqdm.auto import tqdm

from .distributed import all_reduce_sums, broadcast_buffers, from_main, wrap_model
from .fileio import save_torch

__all__ = [
    "Batches",
    "EpochRecord",
    "EvalResult",
    "FitResult",
    "TrainConfig",
    "evaluate",
    "fit",
    "make_optimizer",
    "make_scheduler",
    "resolve_device",
    "seed_everything",
    "train_epoch",
]

logger = logging.getLogger(__name__)

_OPTIMIZERS = ("adam", "sgd", "adamw")
LR_SCHEDULES = ("step", "cosine")
_CHECKPOINT_FORMAT = 1
# Config fields that may differ between a checkpoint and the resuming run.
_RESUME_FREE_FIELDS = frozenset({"epochs"})


class Batches(Protocol):
    """What the loops accept: a sized iterable of ``(inputs, integer targets)`` batches."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (JSON-serialisable via :meth:`to_dict`).

    Attributes:
        optimizer: ``"adam"``, ``"sgd"`` or ``"adamw"``.
        lr: initial learning rate.
        momentum: SGD momentum (ignored by Adam/AdamW).
        weight_decay: L2 penalty (Adam, SGD) or decoupled decay (AdamW).
        epochs: number of epochs.
        milestones: epochs after which the learning rate is multiplied by ``gamma``
            (``lr_schedule="step"`` only).
        gamma: learning-rate decay factor at each milestone.
        lr_schedule: ``"step"`` (decay by ``gamma`` at each milestone) or ``"cosine"``
            (per-epoch cosine annealing from ``lr`` to 0 over ``epochs``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: mixed precision; only active when the resolved device is CUDA.
        grad_clip: maximal global gradient norm, or ``None`` for no clipping.
        label_smoothing: label smoothing of the training loss (evaluation uses plain CE).
        seed: seed of Python, NumPy and torch RNGs at the start of :func:`fit`.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    lr_schedule: str = "step"
    device: str = "auto"
    amp: bool = False
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.optimizer = self.optimizer.lower()
        self.milestones = [int(m) for m in self.milestones]
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if any(m < 1 for m in self.milestones):
            raise ValueError(f"milestones must be positive epochs, got {self.milestones}")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check_device_name(self.device)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**dict(data))


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and accuracy (fraction in [0, 1]) over ``n`` samples."""

    loss: float
    accuracy: float
    n: int


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of :func:`fit`.

    ``epoch`` is 1-based; ``lr`` is the rate used during the epoch; ``train_loss`` is the
    running mean of the training loss (with label smoothing, if configured) while the
    weights were changing; ``seconds`` covers training and validation.
    """

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes:
        best_epoch: 1-based epoch whose weights were loaded into the model at the end.
        best_val_accuracy: validation accuracy of that epoch.
        best_val_loss: validation loss of that epoch.
        history: one record per epoch, including epochs restored from a checkpoint.
        resumed_from: number of completed epochs loaded from a checkpoint (0 if fresh).
    """

    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    history: list[EpochRecord]
    resumed_from: int = 0


def _check_device_name(name: str) -> None:
    if name in ("auto", "cpu", "cuda"):
        return
    if name.startswith("cuda:") and name[5:].isdigit():
        return
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def resolve_device(name: str | torch.device) -> torch.device:
    """Turn a device name into a :class:`torch.device`.

    ``"auto"`` picks CUDA when available, else CPU. Asking for CUDA on a machine
    without it raises ``RuntimeError``; an unknown name raises ``ValueError``.
    """
    if isinstance(name, torch.device):
        name = str(name)
    _check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} requested but CUDA is not available "
            "(use device='cpu' or 'auto')"
        )
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer over all trainable ``model.parameters()`` as described by ``cfg``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule of ``cfg``: ``MultiStepLR`` decaying by
    ``cfg.gamma`` after each of ``cfg.milestones``, or ``CosineAnnealingLR`` to 0 over
    ``cfg.epochs``."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=sorted(cfg.milestones), gamma=cfg.gamma
    )


def _set_epoch(batches: object, epoch: int) -> None:
    set_epoch = getattr(batches, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


def _autocast(device: torch.device, amp: bool) -> Any:
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def _refresh_pruning_reparam(model: nn.Module) -> None:
    """Recompute ``module.weight = weight_orig * weight_mask`` for prune-style modules.

    The derived attribute is only refreshed by the forward pre-hook, so after
    ``load_state_dict`` it would show stale values until the next forward pass.
    """
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                hook(module, ())


def _mean_result(total_loss: torch.Tensor, correct: torch.Tensor, n: int, caller: str) -> EvalResult:
    """Mean loss and accuracy from a pass's sums; under torch.distributed the sums of every
    rank are added first (DDP hook: one process is unchanged)."""
    total_loss, correct, count = all_reduce_sums(total_loss, correct, torch.tensor(n, device=total_loss.device))
    n = int(count)
    if n == 0:
        raise ValueError(f"{caller}() got no samples")
    return EvalResult(loss=total_loss.item() / n, accuracy=correct.item() / n, n=n)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device,
    *,
    amp: bool = False,
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``batches``.

    Runs in eval mode under ``torch.no_grad()`` and restores the model's previous
    train/eval mode afterwards. ``amp`` enables autocast on CUDA only.
    Raises ``ValueError`` if ``batches`` holds no samples.
    """
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        with torch.no_grad():
            for x, y in batches:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                with _autocast(device, amp):
                    out = model(x)
                total_loss += F.cross_entropy(out.float(), y, reduction="sum").double()
                correct += (out.argmax(dim=1) == y).sum()
                n += y.numel()
    finally:
        model.train(was_training)
    return _mean_result(total_loss, correct, n, "evaluate")


def train_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    device: str | torch.device,
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    label_smoothing: float = 0.0,
    progress: bool = True,
    desc: str = "train",
) -> EvalResult:
    """One pass of training over ``batches``; returns the running mean loss/accuracy.

    The model is put in train mode for the pass and its previous mode is restored.
    Mixed precision is used iff ``scaler`` is given (it must be a CUDA ``GradScaler``
    and ``device`` a CUDA device). ``progress=False`` disables the tqdm bar, which is
    also quiet automatically when stderr is not a terminal.
    """
    device = resolve_device(device)
    if scaler is not None and device.type != "cuda":
        raise ValueError("a GradScaler (AMP) is only supported on CUDA devices")
    was_training = model.training
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        for x, y in tqdm(batches, desc=desc, leave=False, disable=None if progress else True):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, scaler is not None):
                out = model(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
            if scaler is None:
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                if grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                scaler.step(optimizer)
                scaler.update()
            total_loss += loss.detach().double() * y.numel()
            correct += (out.detach().argmax(dim=1) == y).sum()
            n += y.numel()
    finally:
        model.train(was_training)
    return _mean_result(total_loss, correct, n, "train_epoch")


# ----------------------------------------------------------------------------- checkpoints


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _load_checkpoint_if_any(path: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` if there is none (DDP hook: run on rank 0)."""
    return _load_checkpoint(path, cfg) if path.exists() else None


def _load_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a nnrelief training checkpoint (format 1)")
    current = cfg.to_dict()
    saved = {**TrainConfig().to_dict(), **ckpt["config"]}  # fields added later: defaults
    diff = sorted(
        k
        for k in set(saved) | set(current)
        if k not in _RESUME_FREE_FIELDS and saved.get(k) != current.get(k)
    )
    if diff:
        details = ", ".join(
            f"{k}: checkpoint={saved.get(k)!r} now={current.get(k)!r}" for k in diff
        )
        raise ValueError(
            f"checkpoint {path} was written with a different TrainConfig ({details}); "
            "use another checkpoint_path or delete it"
        )
    if ckpt["epoch"] > cfg.epochs:
        raise ValueError(
            f"checkpoint {path} has {ckpt['epoch']} completed epochs, more than "
            f"cfg.epochs={cfg.epochs}"
        )
    return ckpt


# ----------------------------------------------------------------------------- fit


def fit(
    model: nn.Module,
    train_batches: Batches,
    val_batches: Batches,
    cfg: TrainConfig,
    *,
    checkpoint_path: Path | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs and keep the best-on-validation weights.

    After every epoch the model is evaluated on ``val_batches`` (a validation split held
    out from the training data, never the test set). The epoch with the highest
    validation accuracy (ties: lower validation loss, then earlier epoch) wins; a full
    copy of its ``state_dict`` (parameters and buffers such as pruning masks) is loaded
    into the model before returning. The model is moved to the configured device and
    left in the train/eval mode it had on entry.

    Seeds all RNGs with ``cfg.seed``, so two CPU runs with the same inputs are
    identical. Also calls ``torch.set_flush_denormal(True)`` (process-wide): denormal
    floats made CPU training about 4x slower.

    Args:
        model: any classifier returning logits ``(N, C)``; prune-style masked layers
            are fine (only ``model.parameters()`` are optimised).
        train_batches: sized iterable of ``(x, y)``; ``set_epoch(epoch)`` (0-based) is
            called before each epoch if present. It should shuffle.
        val_batches: sized iterable of validation ``(x, y)`` batches.
        cfg: hyper-parameters.
        checkpoint_path: if given, after every epoch a checkpoint (model, optimizer,
            scheduler, scaler, best state, history, RNG states) is written atomically
            there. If the file already exists and was written with the same config
            (``epochs`` may differ, e.g. to extend a run), training resumes after its
            last completed epoch and reproduces an uninterrupted run on CPU; the data
            must be the same. A different config raises ``ValueError``.
        progress: show tqdm bars (quiet anyway when stderr is not a terminal).
        on_epoch_end: called with each new :class:`EpochRecord`, after the checkpoint
            of that epoch has been written.

    In a torch.distributed group of several processes (``torchrun``, see
    :mod:`nnrelief.distributed`) the model trains through ``DistributedDataParallel``;
    each process should get its part of every batch (``BatchLoader(rank=, world_size=,
    even_shards=True)``). Losses and accuracies are summed over processes, rank 0 alone
    reads and writes the checkpoint, and BatchNorm statistics are rank 0's after each epoch.
    """
    torch.set_flush_denormal(True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    was_training = model.training
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None

    history: list[EpochRecord] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, best_acc, best_loss = 0, -1.0, float("inf")
    start = 0
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
        ckpt = from_main(_load_checkpoint_if_any, checkpoint_path, cfg)  # DDP hook: rank 0 reads, all get it
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt["scaler"] is not None:
                scaler.load_state_dict(ckpt["scaler"])
            history = [EpochRecord(**r) for r in ckpt["history"]]
            best_state = ckpt["best_state"]
            best_epoch, best_acc, best_loss = (
                ckpt["best_epoch"],
                ckpt["best_val_accuracy"],
                ckpt["best_val_loss"],
            )
            _set_rng_states(ckpt["rng"])
            start = ckpt["epoch"]
            logger.info("resuming from %s after epoch %d", checkpoint_path, start)

    train_model = wrap_model(model)  # DDP hook: DistributedDataParallel under torchrun
    try:
        epochs = tqdm(
            range(start, cfg.epochs),
            desc="epochs",
            initial=start,
            total=cfg.epochs,
            disable=None if progress else True,
        )
        for epoch in epochs:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            _set_epoch(train_batches, epoch)
            train = train_epoch(
                train_model,
                train_batches,
                optimizer,
                device,
                scaler=scaler,
                grad_clip=cfg.grad_clip,
                label_smoothing=cfg.label_smoothing,
                progress=progress,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
            )
            scheduler.step()
            broadcast_buffers(model)  # DDP hook: BatchNorm statistics of rank 0
            _set_epoch(val_batches, epoch)
            val = evaluate(model, val_batches, device, amp=cfg.amp)
            record = EpochRecord(
                epoch=epoch + 1,
                train_loss=train.loss,
                train_accuracy=train.accuracy,
                val_loss=val.loss,
                val_accuracy=val.accuracy,
                lr=lr,
                seconds=time.perf_counter() - t0,
            )
            history.append(record)
            if not np.isfinite(train.loss):
                logger.warning("epoch %d: non-finite training loss %s", epoch + 1, train.loss)
            if val.accuracy > best_acc or (val.accuracy == best_acc and val.loss < best_loss):
                best_epoch, best_acc, best_loss = epoch + 1, val.accuracy, val.loss
                best_state = _cpu_state(model)
            logger.info(
                "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | "
                "lr %.3g | %.1fs",
                record.epoch, cfg.epochs, record.train_loss, record.train_accuracy,
                record.val_loss, record.val_accuracy, record.lr, record.seconds,
            )  # fmt: skip
            epochs.set_postfix(train_loss=f"{train.loss:.4f}", val_acc=f"{val.accuracy:.4f}")
            if checkpoint_path is not None:
                save_torch(
                    {
                        "format": _CHECKPOINT_FORMAT,
                        "config": cfg.to_dict(),
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "best_state": best_state,
                        "best_epoch": best_epoch,
                        "best_val_accuracy": best_acc,
                        "best_val_loss": best_loss,
                        "history": [dataclasses.asdict(r) for r in history],
                        "rng": _rng_states(),
                    },
                    checkpoint_path,
                )
            if on_epoch_end is not None:
                on_epoch_end(record)
        epochs.close()
    finally:
        model.train(was_training)

    assert best_state is not None  # cfg.epochs >= 1 guarantees at least one epoch
    model.load_state_dict(best_state)
    _refresh_pruning_reparam(model)
    logger.info("best epoch %d: val acc %.4f, val loss %.4f", best_epoch, best_acc, best_loss)
    return FitResult(
        best_epoch=best_epoch,
        best_val_accuracy=best_acc,
        best_val_loss=best_loss,
        history=history,
        resumed_from=start,
    )
