"""The settings of one training run (:class:`TrainConfig`) and device names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..settings import check_fields, document, normalise_choice, setting

OPTIMIZERS = ("adam", "sgd", "adamw")
LR_SCHEDULES = ("step", "cosine")
AMP_MODES = ("off", "bf16", "fp16")
METRICS = ("accuracy", "loss")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


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
    metric: str = setting(
        "accuracy", choices=METRICS,
        help="what picks the best epoch: 'accuracy' (highest validation accuracy, ties: lower loss) or 'loss' (lowest "
        "validation loss, ties: the earlier epoch; language models)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.milestones = [int(m) for m in self.milestones]
        self.amp = amp_mode(self.amp)
        check_fields(self)
        self._check_float32()
        check_device_name(self.device)

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


def check_device_name(name: str) -> None:
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
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} requested but CUDA is not available "
            "(use device='cpu' or 'auto')"
        )
    return torch.device(name)
