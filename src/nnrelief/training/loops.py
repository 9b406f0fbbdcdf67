"""One pass over the data: :func:`evaluate` and :func:`train_epoch` (and its optimisation step).

Losses and accuracies are summed on the device and read once per pass (summed over the
processes under torchrun, :mod:`.parallel`): the training step never waits for the device.
On CUDA the passes use autocast (``amp``) and channels_last for conv nets.

A model may return logits ``(N, C)`` for targets ``(N,)``, or, as a language model does,
logits ``(B, T, V)`` for next-token targets ``(B, T)`` (then every token counts as a
sample), as a tensor or as the ``logits`` of a Hugging Face ``ModelOutput``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..kinds import kind_of
from .config import amp_mode, resolve_device
from .lmmetrics import bits_per_token, perplexity
from .parallel import all_reduce_sums

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Batches(Protocol):
    """What the loops accept: a sized iterable of ``(inputs, integer targets)`` batches."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class EvalResult:
    """Mean loss (cross-entropy, nats) and accuracy (fraction in [0, 1]) over ``n`` samples
    (of a language model: tokens; the accuracy is that of the most likely next token)."""

    loss: float
    accuracy: float
    n: int

    @property
    def bits_per_token(self) -> float:
        """The mean loss in bits per token (bits per byte for byte tokens)."""
        return bits_per_token(self.loss)

    @property
    def perplexity(self) -> float:
        """``exp(loss)``."""
        return perplexity(self.loss)


def _logits(output: Any) -> torch.Tensor:
    """A model's logits: its output tensor, or the ``logits`` of a Hugging Face ``ModelOutput``."""
    return output if isinstance(output, torch.Tensor) else output.logits


def _per_target(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and targets (N,): a language model's logits (B, T, V) and targets
    (B, T) become one row per token; a classifier's pass unchanged."""
    if y.dim() > 1 and out.shape[:-1] == y.shape:
        return out.reshape(-1, out.shape[-1]), y.reshape(-1)
    return out, y


def _autocast(device: torch.device, amp: str) -> Any:
    if amp != "off" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=_AMP_DTYPES[amp])
    return nullcontext()


def uses_channels_last(model: nn.Module, device: torch.device) -> bool:
    """channels_last pays off for conv nets on CUDA (tensor-core convolutions): a layer whose
    kind says so (:meth:`nnrelief.kinds.LayerKind.uses_channels_last`, 2-d convs)."""
    if device.type != "cuda":
        return False
    return any(kind is not None and kind.uses_channels_last(m) for m in model.modules() for kind in [kind_of(m)])


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class _Tally:
    """A pass's running loss sum, correct count and sample count, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.samples = 0

    def add(self, loss_sum: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss_sum.double()
        self.correct += (out.argmax(dim=1) == y).sum()
        self.samples += y.numel()

    def result(self, caller: str) -> EvalResult:
        """Mean loss and accuracy, read with one host synchronisation; under
        torch.distributed the sums of every rank are added first (one process: unchanged)."""
        count = torch.tensor(self.samples, dtype=torch.float64, device=self.loss.device)
        total_loss, correct, count = all_reduce_sums(self.loss, self.correct.double(), count)
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
    channels_last = uses_channels_last(model, device)
    was_training = model.training
    model.eval()
    tally = _Tally(device)
    try:
        with torch.no_grad():
            for x, y in batches:
                x = _to_device(x, device, channels_last)
                y = y.to(device, non_blocking=True)
                with _autocast(device, amp):
                    out, y = _per_target(_logits(model(x)), y)
                tally.add(F.cross_entropy(out.float(), y, reduction="sum"), out, y)
    finally:
        model.train(was_training)
    return tally.result("evaluate")


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
    channels_last = uses_channels_last(model, device)
    was_training = model.training
    model.train()
    tally = _Tally(device)
    try:
        for x, y in tqdm(batches, desc=desc, leave=False, disable=None if progress else True):
            x = _to_device(x, device, channels_last)
            y = y.to(device, non_blocking=True)
            out, y, loss = _train_step(model, optimizer, x, y, device, amp, scaler, grad_clip, label_smoothing)
            tally.add(loss.double() * y.numel(), out, y)
    finally:
        model.train(was_training)
    return tally.result("train_epoch")


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step; returns the detached logits, the targets (both one row per
    target) and the loss, still on the device."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, amp):
        out, y = _per_target(_logits(model(x)), y)
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
    return out.detach(), y, loss.detach()
