"""The pass's inputs: pruning batches moved to the model's device, and the checks that
refuse non-finite batches or parameters (naming them) before anything is changed."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..analysis import one_signature
from ..inputs import ModelInput, batch_input


class PruningBatches:
    """The pruning batches moved to the model's device, with one running record, kept on
    the device, of the first input tensor holding NaN or inf (read once after the pass: no
    host synchronisation per batch, and no per-batch tensor kept alive)."""

    def __init__(self, batches: Iterable[Any], device: torch.device) -> None:
        self.batches = batches
        self.device = device
        self.first_bad: Tensor | None = None
        self.where: list[tuple[int, tuple[int, ...]]] = []

    def __iter__(self) -> Iterator[ModelInput]:
        for index, batch in enumerate(self.batches):
            model_input = batch_input(batch, index).map(lambda tensor: tensor.to(self.device, non_blocking=True))
            for tensor in model_input.tensors():
                if tensor.is_floating_point():
                    # A float64 sum of finite entries is finite (short of float64's own range).
                    bad = ~torch.isfinite(tensor.sum(dtype=torch.float64))
                    if self.first_bad is None:
                        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
                    self.first_bad = torch.where(bad & (self.first_bad < 0), len(self.where), self.first_bad)
                    self.where.append((index, tuple(tensor.shape)))
            yield model_input

    def one_signature(self) -> bool:
        """Whether, known before the pass, every batch's inputs have one signature, shapes
        included (a capture for exactly those shapes then serves them all): a list or tuple
        of such batches, or a loader saying its batches are all the same size (``same_size``,
        as :class:`nnrelief.data.BatchLoader` does)."""
        if getattr(self.batches, "same_size", False) is True:
            return True
        if not isinstance(self.batches, (list, tuple)) or not self.batches:
            return False
        return one_signature(batch_input(batch, index) for index, batch in enumerate(self.batches))

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming the first batch that held NaN or inf values."""
        first = -1 if self.first_bad is None else int(self.first_bad)
        if first >= 0:
            index, shape = self.where[first]
            raise ValueError(f"pruning batch {index} (shape {shape}) contains NaN or inf values; clean the data first")


def _finite(tensor: Tensor) -> Tensor:
    """Whether every entry is finite, without a tensor-sized temporary: min and max carry a
    NaN or an infinity through."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = tensor.aminmax()
    return low.isfinite() & high.isfinite()


def check_finite_model(model: nn.Module) -> None:
    """Refuse a model with NaN/inf parameters or buffers (a diverged training), naming them."""
    named = [(name, t) for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_floating_point()]
    if not named:
        return
    checks = [_finite(t.detach()) for _, t in named]
    one_device = len({check.device for check in checks}) == 1
    finite = torch.stack(checks).tolist() if one_device else [bool(check) for check in checks]  # one host sync
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if bad:
        raise ValueError(
            f"{type(model).__name__} has NaN or inf values in {', '.join(bad)}; the model was left unchanged. "
            "Its training probably diverged: prune a model with finite weights (an earlier checkpoint, "
            "or retrain with a lower learning rate)"
        )
