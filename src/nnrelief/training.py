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
* On CUDA: mixed precision with ``TrainConfig.amp`` (``"bf16"``: autocast only;
  ``"fp16"``: autocast + ``GradScaler``), channels_last memory format for conv nets,
  cuDNN benchmark mode, fused optimizers and optionally ``torch.compile``. The CPU path
  never touches any of them. Losses and accuracies are summed on the device and read once
  per epoch: the training step never waits for the device.
* A training loss that becomes NaN or inf stops :func:`fit` with
  :class:`TrainingDivergedError` (checked once per epoch); the model keeps its last good
  weights and the checkpoint stays at the last good epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
from tqdm.auto import tqdm

from .distributed import all_reduce_sums, broadcast_buffers, from_main, wrap_model
from .fileio import save_torch
from .masks import refresh_masked
from .settings import check_fields, document, normalise_choice, setting

__all__ = [
    "AMP_MODES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "Batches",
    "EpochRecord",
    "EvalResult",
    "FitResult",
    "TrainConfig",
    "TrainingDivergedError",
    "evaluate",
    "fit",
    "make_optimizer",
    "make_scheduler",
    "resolve_device",
    "seed_everything",
    "train_epoch",
]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd", "adamw")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
LR_SCHEDULES = ("step", "cosine")
AMP_MODES = ("off", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CHECKPOINT_FORMAT = 1
# Config fields that may differ between a checkpoint and the resuming run (a run may be
# extended, and continued on another device or with(out) torch.compile).
_RESUME_FREE_FIELDS = frozenset({"epochs", "device", "compile"})


class Batches(Protocol):
    """What the loops accept: a sized iterable of ``(inputs, integer targets)`` batches."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


@document
@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (JSON-serialisable via :meth:`to_dict`).

    ``amp`` ``True``/``False`` (checkpoints written before the modes existed) mean
    ``"fp16"``/``"off"``; a choice given in another case (``"SGD"``) is spelled as declared."""

    optimizer: str = setting("adam", help="adam, sgd or adamw", choices=OPTIMIZERS)
    lr: float = setting(1e-3, help="initial learning rate", range="(0, inf)")
    momentum: float = setting(0.9, help="SGD momentum (ignored by Adam/AdamW)", range="[0, 1)")
    weight_decay: float = setting(0.0, help="L2 penalty (Adam, SGD) or decoupled decay (AdamW)", range="[0, inf)")
    epochs: int = setting(10, help="number of epochs", range="[1, inf)")
    milestones: list[int] = setting(
        factory=list, range="[1, inf)", metavar="EPOCH",
        help="epochs after which the learning rate is multiplied by gamma (lr_schedule 'step' only; none = no decay)",
    )  # fmt: skip
    gamma: float = setting(0.1, help="learning-rate decay factor at each milestone", range="(0, inf)")
    lr_schedule: str = setting(
        "step", choices=LR_SCHEDULES,
        help="learning-rate schedule: 'step' (decay by gamma at each milestone) or 'cosine' (annealing to 0 over the epochs)",
    )  # fmt: skip
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N")
    amp: str = setting(
        "off", choices=AMP_MODES,
        help="mixed precision of training on CUDA: off, bf16 (bfloat16 autocast) or fp16 (float16 autocast with a "
        "GradScaler); ignored on the CPU",
    )  # fmt: skip
    compile: bool = setting(False, help="train through torch.compile (the first epoch is slower while it compiles)")
    grad_clip: float | None = setting(None, help="maximal global gradient norm (None: no clipping)", range="(0, inf)")
    label_smoothing: float = setting(
        0.0, help="label smoothing of the training loss (evaluation uses plain cross-entropy)", range="[0, 1)"
    )
    seed: int = setting(0, help="seed of Python, NumPy and torch RNGs at the start of fit()")

    def __post_init__(self) -> None:
        self.milestones = [int(m) for m in self.milestones]
        self.amp = amp_mode(self.amp)
        check_fields(self)
        self._check_float32()
        _check_device_name(self.device)

    def _check_float32(self) -> None:
        """The optimizers apply lr and weight decay to float32 weights: refuse values that
        overflow float32 there (Adam scales lr by up to 10 at its first step; the step
        schedule multiplies it by gamma at each milestone)."""
        largest_lr = self.lr * 10
        for _ in self.milestones if self.lr_schedule == "step" else ():
            largest_lr *= max(1.0, self.gamma)  # inf rather than OverflowError
        limit = f"float32's largest number is {_FLOAT32_MAX:.4g}"
        if not self.lr * 10 <= _FLOAT32_MAX:
            raise ValueError(f"lr {self.lr:g} overflows the float32 weights (the optimizers scale it by up to 10; {limit})")
        if not largest_lr <= _FLOAT32_MAX:
            raise ValueError(f"gamma {self.gamma:g} at {len(self.milestones)} milestone(s) raises lr {self.lr:g} "
                             f"beyond float32 ({limit})")  # fmt: skip
        if not self.weight_decay * max(1.0, self.lr) <= _FLOAT32_MAX:
            raise ValueError(f"weight_decay {self.weight_decay:g} overflows the float32 weights (times lr "
                             f"{self.lr:g}; {limit})")  # fmt: skip

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


def amp_mode(value: str | bool) -> str:
    """Validate a mixed-precision setting; ``True``/``False`` (the old boolean flag) become
    ``"fp16"``/``"off"``."""
    if isinstance(value, bool):
        return "fp16" if value else "off"
    return normalise_choice(value, AMP_MODES, "amp")


class TrainingDivergedError(ValueError):
    """The training loss became NaN or inf; the message names the phase and the epoch."""


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


def _autocast(device: torch.device, amp: str) -> Any:
    if amp != "off" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=_AMP_DTYPES[amp])
    return nullcontext()


def _uses_channels_last(model: nn.Module, device: torch.device) -> bool:
    """channels_last pays off for conv nets on CUDA (tensor-core convolutions)."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _mean_result(total_loss: torch.Tensor, correct: torch.Tensor, n: int, caller: str) -> EvalResult:
    """Mean loss and accuracy from a pass's on-device sums, read with one host
    synchronisation; under torch.distributed the sums of every rank are added first (DDP
    hook: one process is unchanged)."""
    count = torch.tensor(n, dtype=torch.float64, device=total_loss.device)
    total_loss, correct, count = all_reduce_sums(total_loss, correct.double(), count)
    loss_sum, correct_sum, n_all = torch.stack([total_loss, correct, count]).tolist()
    n = int(n_all)
    if n == 0:
        raise ValueError(f"{caller}() got no samples")
    return EvalResult(loss=loss_sum / n, accuracy=correct_sum / n, n=n)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device,
    *,
    amp: str | bool = "off",
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``batches``.

    Runs in eval mode under ``torch.no_grad()`` and restores the model's previous
    train/eval mode afterwards. ``amp`` (see :class:`TrainConfig`) applies on CUDA only.
    Raises ``ValueError`` if ``batches`` holds no samples.
    """
    device = resolve_device(device)
    amp = amp_mode(amp)
    channels_last = _uses_channels_last(model, device)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        with torch.no_grad():
            for x, y in batches:
                x = _to_device(x, device, channels_last)
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
    amp: str | bool = "off",
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    label_smoothing: float = 0.0,
    progress: bool = True,
    desc: str = "train",
) -> EvalResult:
    """One pass of training over ``batches``; returns the running mean loss/accuracy.

    The model is put in train mode for the pass and its previous mode is restored.
    ``amp`` (see :class:`TrainConfig`) applies on CUDA only; ``"fp16"`` needs a CUDA
    ``scaler``, and a ``scaler`` given with ``amp="off"`` means ``"fp16"`` (the former
    interface). Loss and accuracy are summed on the device and read once at the end.
    ``progress=False`` disables the tqdm bar, which is also quiet automatically when
    stderr is not a terminal.
    """
    device = resolve_device(device)
    amp = amp_mode(amp)
    if scaler is not None:
        if device.type != "cuda":
            raise ValueError("a GradScaler (AMP) is only supported on CUDA devices")
        amp = "fp16" if amp == "off" else amp
    if amp == "fp16" and device.type == "cuda" and scaler is None:
        raise ValueError("amp='fp16' needs a GradScaler (fit makes one)")
    channels_last = _uses_channels_last(model, device)
    was_training = model.training
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        for x, y in tqdm(batches, desc=desc, leave=False, disable=None if progress else True):
            x = _to_device(x, device, channels_last)
            y = y.to(device, non_blocking=True)
            out, loss = _train_step(model, optimizer, x, y, device, amp, scaler, grad_clip, label_smoothing)
            total_loss += loss.double() * y.numel()
            correct += (out.argmax(dim=1) == y).sum()
            n += y.numel()
    finally:
        model.train(was_training)
    return _mean_result(total_loss, correct, n, "train_epoch")


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    amp: str,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns the detached logits and loss (still on the device)."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, amp):
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
    return out.detach(), loss.detach()


# ----------------------------------------------------------------------------- fit state


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
    cuda = states["cuda"]
    # A run resumed on a machine with another number of GPUs keeps the fresh CUDA seeds.
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class _Progress:
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
            self.best_state = _cpu_state(model)


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
        if _uses_channels_last(model, device):
            model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg)
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" and device.type == "cuda" else None
        wrapped = wrap_model(model)  # DDP hook: DistributedDataParallel under torchrun
        runner = torch.compile(wrapped) if cfg.compile else wrapped
        evaluator = runner if wrapped is model else (torch.compile(model) if cfg.compile else model)
        return cls(model, runner, device, optimizer, scheduler, scaler, evaluator)


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, cfg: TrainConfig, session: _Session, progress: _Progress) -> None:
    """Write everything needed to resume after the last completed epoch (atomically)."""
    save_torch(
        {
            "format": _CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "epoch": progress.epochs_done,
            "model": session.model.state_dict(),
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


def _read_checkpoint_if_any(path: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (checked against ``cfg``), or ``None`` if there is none
    (DDP hook: rank 0 reads it for every rank through ``from_main``)."""
    return _read_checkpoint(path, cfg) if path.exists() else None


def _restore_checkpoint(ckpt: dict[str, Any], path: Path, session: _Session) -> _Progress:
    """Load a checkpoint of :func:`_save_checkpoint` (read from ``path``) into ``session``;
    the progress it holds.

    Tensors are read onto the CPU and copied to wherever the session's tensors live, so a
    checkpoint written on a GPU resumes on a CPU-only machine and the other way round.
    """
    session.model.load_state_dict(ckpt["model"])
    session.optimizer.load_state_dict(_with_current_kernels(ckpt["optimizer"], session.optimizer))
    session.scheduler.load_state_dict(ckpt["scheduler"])
    if session.scaler is not None and ckpt["scaler"] is not None:
        session.scaler.load_state_dict(ckpt["scaler"])
    _set_rng_states(ckpt["rng"])
    progress = _Progress(
        history=[EpochRecord(**r) for r in ckpt["history"]],
        best_state=ckpt["best_state"],
        best_epoch=ckpt["best_epoch"],
        best_val_accuracy=ckpt["best_val_accuracy"],
        best_val_loss=ckpt["best_val_loss"],
    )
    if progress.epochs_done != ckpt["epoch"]:
        raise ValueError(f"checkpoint {path} is inconsistent: {ckpt['epoch']} epochs but {progress.epochs_done} records")
    return progress


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
    session = _Session.start(model, cfg, device)
    state = _Progress()
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
        ckpt = from_main(_read_checkpoint_if_any, checkpoint_path, cfg)  # DDP hook: rank 0 reads, all get it
        if ckpt is not None:
            state = _restore_checkpoint(ckpt, checkpoint_path, session)
            logger.info("%s: resuming from %s after epoch %d", desc, checkpoint_path, state.epochs_done)
    start = state.epochs_done
    entry_state = _cpu_state(model) if state.best_state is None else None
    try:
        torch.backends.cudnn.benchmark = benchmark or device.type == "cuda"
        _train_epochs(session, train_batches, val_batches, cfg, state, checkpoint_path, progress, on_epoch_end, desc)
    except TrainingDivergedError:
        _load_weights(model, state.best_state if state.best_state is not None else entry_state)
        raise
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if _uses_channels_last(model, device):
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
    model.load_state_dict(state)
    refresh_masked(model)  # the masked .weight attributes would stay stale until a forward


def _train_epochs(
    session: _Session,
    train_batches: Batches,
    val_batches: Batches,
    cfg: TrainConfig,
    state: _Progress,
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
            _save_checkpoint(checkpoint_path, cfg, session, state)
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
    broadcast_buffers(session.model)  # DDP hook: BatchNorm statistics of rank 0
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
