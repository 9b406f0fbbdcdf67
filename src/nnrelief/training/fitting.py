"""`fit`: train for a number of epochs, keep the best-on-validation weights, checkpoint
every epoch and resume (:mod:`.checkpoint`)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..fileio import cpu_state
from ..pruning.masks import hold_masks, restore_masks
from .checkpoint import EpochRecord, Progress, restore_checkpoint, save_checkpoint
from .config import TrainConfig, resolve_device
from .loops import Batches, evaluate, train_epoch, uses_channels_last
from .parallel import broadcast_buffers, checkpoint_on_every_rank, wrap_model

logger = logging.getLogger(__name__)


class TrainingDivergedError(ValueError):
    """The training loss became NaN or inf; the message names the phase and the epoch."""


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


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer over all trainable ``model.parameters()`` as described by ``cfg``.

    When every parameter is a floating CUDA tensor the fused implementation is used (one
    kernel per step, and no host synchronisation with a ``GradScaler``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    options: dict[str, Any] = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **options
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **options)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **options)


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


@dataclass
class _Session:
    """The live objects of one :func:`fit` call on its device."""

    model: nn.Module
    runner: nn.Module  # what trains: the model, its DDP wrapper, compiled or not
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    evaluator: nn.Module  # what validates: the model itself (no DDP), compiled or not

    @classmethod
    def start(cls, model: nn.Module, cfg: TrainConfig, device: torch.device) -> _Session:
        """Move ``model`` to ``device`` (channels_last for conv nets on CUDA) and build the
        optimizer, schedule, scaler and (``cfg.compile``) compiled runner."""
        model.to(device)
        if uses_channels_last(model, device):
            model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg)
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" and device.type == "cuda" else None
        wrapped = wrap_model(model)  # DistributedDataParallel under torchrun
        runner = torch.compile(wrapped) if cfg.compile else wrapped
        evaluator = runner if wrapped is model else (torch.compile(model) if cfg.compile else model)
        return cls(model, runner, device, optimizer, scheduler, scaler, evaluator)


def fit(
    model: nn.Module,
    train_batches: Batches,
    val_batches: Batches,
    cfg: TrainConfig,
    *,
    checkpoint_path: Path | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
    desc: str = "training",
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
    floats made CPU training about 4x slower. On CUDA, cuDNN benchmark mode is on during
    the call.

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
            must be the same. A different config raises ``ValueError``. A checkpoint
            written on a GPU resumes on a CPU and the other way round.
        progress: show tqdm bars (quiet anyway when stderr is not a terminal).
        on_epoch_end: called with each new :class:`EpochRecord`, after the checkpoint
            of that epoch has been written.
        desc: name of the training phase (e.g. ``"retraining, iteration 3"``), used in
            progress bars and errors.

    Raises:
        TrainingDivergedError: the mean training loss of an epoch is NaN or inf. The
            model then holds the best weights of the finite epochs (its weights on entry
            if the first epoch diverged) and the checkpoint stays at the last good epoch.

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
    benchmark = torch.backends.cudnn.benchmark
    hold_masks(model)  # masks of a copied or unpickled model hold from the first step
    session = _Session.start(model, cfg, device)
    state = Progress()
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
        ckpt = checkpoint_on_every_rank(checkpoint_path, cfg)
        if ckpt is not None:
            state = restore_checkpoint(ckpt, checkpoint_path, session)
            logger.info("%s: resuming from %s after epoch %d", desc, checkpoint_path, state.epochs_done)
    start = state.epochs_done
    entry_state = cpu_state(model) if state.best_state is None else None
    try:
        torch.backends.cudnn.benchmark = benchmark or device.type == "cuda"
        _train_epochs(session, train_batches, val_batches, cfg, state, checkpoint_path, progress, on_epoch_end, desc)
    except TrainingDivergedError:
        _load_weights(model, state.best_state if state.best_state is not None else entry_state)
        raise
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if uses_channels_last(model, device):
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    _load_weights(model, state.best_state)
    logger.info(
        "best epoch %d (%s): val acc %.4f, val loss %.4f",
        state.best_epoch, desc, state.best_val_accuracy, state.best_val_loss,
    )  # fmt: skip
    return FitResult(
        best_epoch=state.best_epoch,
        best_val_accuracy=state.best_val_accuracy,
        best_val_loss=state.best_val_loss,
        history=state.history,
        resumed_from=start,
    )


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    assert state is not None  # cfg.epochs >= 1 guarantees one epoch, or we kept the entry state
    restore_masks(model, state, infer=False)


def _train_epochs(
    session: _Session,
    train_batches: Batches,
    val_batches: Batches,
    cfg: TrainConfig,
    state: Progress,
    checkpoint_path: Path | None,
    progress: bool,
    on_epoch_end: Callable[[EpochRecord], None] | None,
    desc: str,
) -> None:
    """The epochs after the last completed one: train, validate, record, checkpoint."""
    epochs = tqdm(
        range(state.epochs_done, cfg.epochs), desc=desc, initial=state.epochs_done, total=cfg.epochs,
        disable=None if progress else True,
    )  # fmt: skip
    for epoch in epochs:
        record = _run_epoch(session, train_batches, val_batches, cfg, epoch, progress, desc)
        state.add(record, session.model)
        logger.info(
            "epoch %d/%d (%s): train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.3g | %.1fs",
            record.epoch, cfg.epochs, desc, record.train_loss, record.train_accuracy,
            record.val_loss, record.val_accuracy, record.lr, record.seconds,
        )  # fmt: skip
        epochs.set_postfix(train_loss=f"{record.train_loss:.4f}", val_acc=f"{record.val_accuracy:.4f}")
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, cfg, session, state)
        if on_epoch_end is not None:
            on_epoch_end(record)
    epochs.close()


def _run_epoch(
    session: _Session,
    train_batches: Batches,
    val_batches: Batches,
    cfg: TrainConfig,
    epoch: int,
    progress: bool,
    desc: str,
) -> EpochRecord:
    """Train and validate one epoch (0-based ``epoch``); its record.

    Raises :class:`TrainingDivergedError` when the epoch's mean training loss is not finite.
    """
    t0 = time.perf_counter()
    lr = session.optimizer.param_groups[0]["lr"]
    _set_epoch(train_batches, epoch)
    train = train_epoch(
        session.runner, train_batches, session.optimizer, session.device,
        amp=cfg.amp, scaler=session.scaler, grad_clip=cfg.grad_clip,
        label_smoothing=cfg.label_smoothing, progress=progress,
        desc=f"{desc}, epoch {epoch + 1}/{cfg.epochs}",
    )  # fmt: skip
    if not math.isfinite(train.loss):
        raise TrainingDivergedError(
            f"{desc}: the training loss became {train.loss} in epoch {epoch + 1}/{cfg.epochs} "
            f"(learning rate {lr:.3g}); the model keeps its last good weights. Lower the "
            "learning rate, set grad_clip, or check the data for NaN/inf values."
        )
    session.scheduler.step()
    broadcast_buffers(session.model)  # torchrun: BatchNorm statistics of rank 0
    _set_epoch(val_batches, epoch)
    val = evaluate(session.evaluator, val_batches, session.device, amp=cfg.amp)
    return EpochRecord(
        epoch=epoch + 1,
        train_loss=train.loss,
        train_accuracy=train.accuracy,
        val_loss=val.loss,
        val_accuracy=val.accuracy,
        lr=lr,
        seconds=time.perf_counter() - t0,
    )
