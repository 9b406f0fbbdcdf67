"""The per-epoch checkpoint of :func:`~nnrelief.training.fit`: what it holds (weights,
optimizer, schedule, scaler, the best epoch so far, the records, RNG states), writing it
atomically and resuming from it (bit-exactly on CPU, across devices)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..fileio import cpu_state, save_torch
from ..pruning.masks import ORIG, restore_masks, state_with_masks
from .config import TrainConfig

_CHECKPOINT_FORMAT = 1
# Config fields that may differ between a checkpoint and the resuming run (a run may be
# extended, and continued on another device or with(out) torch.compile).
_RESUME_FREE_FIELDS = frozenset({"epochs", "device", "compile"})


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of :func:`~nnrelief.training.fit`.

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


class Resumable(Protocol):
    """The live objects of a training run that a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None


def _rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    cuda = states["cuda"]
    # A run resumed on a machine with another number of GPUs keeps the fresh CUDA seeds.
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class Progress:
    """What :func:`fit` carries from epoch to epoch: the records and the best epoch so far."""

    history: list[EpochRecord] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_val_loss: float = float("inf")

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def add(self, record: EpochRecord, model: nn.Module) -> None:
        """Append ``record``; keep a CPU copy of the weights if the epoch is the best one
        (highest validation accuracy, ties: lower validation loss, then earlier)."""
        self.history.append(record)
        better_loss = record.val_accuracy == self.best_val_accuracy and record.val_loss < self.best_val_loss
        if record.val_accuracy > self.best_val_accuracy or better_loss:
            self.best_epoch = record.epoch
            self.best_val_accuracy, self.best_val_loss = record.val_accuracy, record.val_loss
            self.best_state = cpu_state(model)


def save_checkpoint(path: Path, cfg: TrainConfig, session: Resumable, progress: Progress) -> None:
    """Write everything needed to resume after the last completed epoch (atomically)."""
    save_torch(
        {
            "format": _CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "epoch": progress.epochs_done,
            "model": state_with_masks(session.model),
            "optimizer": session.optimizer.state_dict(),
            "scheduler": session.scheduler.state_dict(),
            "scaler": session.scaler.state_dict() if session.scaler is not None else None,
            "best_state": progress.best_state,
            "best_epoch": progress.best_epoch,
            "best_val_accuracy": progress.best_val_accuracy,
            "best_val_loss": progress.best_val_loss,
            "history": [dataclasses.asdict(r) for r in progress.history],
            "rng": _rng_states(),
        },
        path,
    )


def read_checkpoint_if_any(path: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (checked against ``cfg``), or ``None`` if there is none
    (under torchrun rank 0 alone reads it: :func:`.parallel.checkpoint_on_every_rank`)."""
    return _read_checkpoint(path, cfg) if path.exists() else None


def restore_checkpoint(ckpt: dict[str, Any], path: Path, session: Resumable) -> Progress:
    """Load a checkpoint of :func:`save_checkpoint` (read from ``path``) into ``session``;
    the progress it holds.

    Tensors are read onto the CPU and copied to wherever the session's tensors live, so a
    checkpoint written on a GPU resumes on a CPU-only machine and the other way round.
    """
    restore_masks(session.model, ckpt["model"], infer=False)
    optimizer_state = _in_current_order(ckpt["optimizer"], ckpt["model"], session.model)
    session.optimizer.load_state_dict(_with_current_kernels(optimizer_state, session.optimizer))
    session.scheduler.load_state_dict(ckpt["scheduler"])
    if session.scaler is not None and ckpt["scaler"] is not None:
        session.scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"])
    progress = Progress(
        history=[EpochRecord(**r) for r in ckpt["history"]],
        best_state=ckpt["best_state"],
        best_epoch=ckpt["best_epoch"],
        best_val_accuracy=ckpt["best_val_accuracy"],
        best_val_loss=ckpt["best_val_loss"],
    )
    if progress.epochs_done != ckpt["epoch"]:
        raise ValueError(f"checkpoint {path} is inconsistent: {ckpt['epoch']} epochs but {progress.epochs_done} records")
    return progress


def _in_current_order(saved: dict[str, Any], model_state: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """``saved`` optimizer state mapped onto today's parameter order. Checkpoints of earlier
    versions (torch.nn.utils.prune masks) list a masked parameter as ``<name>_orig``, moved
    after its module's other parameters, so their optimizer indices follow that order."""
    if not any(key.endswith(ORIG) for key in model_state):
        return saved
    trained = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    position = {name: index for index, name in enumerate(trained)}
    earlier = [key.removesuffix(ORIG) for key in model_state if key.removesuffix(ORIG) in position]
    if sorted(earlier) != sorted(trained):
        raise ValueError("the checkpoint's model does not have the parameters of the model being trained")
    new_index = [position[name] for name in earlier]  # earlier index -> today's
    state = {new_index[int(index)]: value for index, value in saved["state"].items()}
    groups = [{**group, "params": sorted(new_index[int(index)] for index in group["params"])} for group in saved["param_groups"]]
    return {**saved, "state": state, "param_groups": groups}


def _with_current_kernels(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``saved`` with this optimizer's implementation choices (fused/foreach/capturable):
    a fused CUDA optimizer's state must resume on a CPU one and the other way round."""
    current = optimizer.param_groups
    groups = [
        {**group, **{k: now[k] for k in ("fused", "foreach", "capturable") if k in now}}
        for group, now in zip(saved["param_groups"], current)
    ]
    return {**saved, "param_groups": groups}


def _read_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a nnrelief training checkpoint (format 1)")
    current = cfg.to_dict()
    try:  # fields added later take their defaults; old values (amp: false) are normalised
        saved = TrainConfig.from_dict({**TrainConfig().to_dict(), **ckpt["config"]}).to_dict()
    except ValueError as error:
        raise ValueError(f"checkpoint {path} holds an invalid TrainConfig: {error}") from None
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
