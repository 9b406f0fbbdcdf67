"""Whole-batch tensor transforms: normalisation and crop/flip augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalize:
    """Map uint8 pixels to float32: ``(pixels * scale - mean) / std`` per channel.

    With ``mean``/``std`` left ``None`` only the scaling is applied (pixels / 255).
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1.0 / 255.0

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("Normalize needs both mean and std, or neither")
        if self.std is not None and self.mean is not None:
            if len(self.mean) != len(self.std):
                raise ValueError(f"mean has {len(self.mean)} channels, std {len(self.std)}")
            if min(self.std) <= 0:
                raise ValueError(f"std must be positive, got {self.std}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise a (B, C, H, W) batch; returns a new float32 tensor on its device."""
        x = images.to(torch.float32)
        if self.mean is None or self.std is None:
            return x.mul_(self.scale)
        if len(self.mean) != x.shape[1]:
            raise ValueError(f"Normalize has {len(self.mean)} channels, batch has {x.shape[1]}")
        factor, shift = _affine(self.mean, self.std, self.scale, x.device)
        return x.mul_(factor).sub_(shift)


@cache
def _affine(mean: tuple[float, ...], std: tuple[float, ...], scale: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``scale / std`` and ``mean / std`` as (C, 1, 1) float32 tensors on
    ``device``, made once per device: a tensor built from host numbers for every batch
    would make the host wait for the GPU each time."""
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    return (scale / std_t).to(device), (mean_t / std_t).to(device)


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without making the host wait for a GPU
    (through pinned memory; a plain copy to CUDA synchronises)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, padding: int = 4
) -> torch.Tensor:
    """Random crop (same size, zero padding) and random horizontal flip of a whole batch.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` followed by
    ``RandomHorizontalFlip()`` on every sample, done with one pad and one gather.
    Random numbers come from ``generator`` (a CPU generator), so the result does not
    depend on the device of ``images``.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    cols_in_crop = torch.arange(w)
    cols_in_crop = torch.where(flip[:, None], w - 1 - cols_in_crop, cols_in_crop)
    rows = to_device_async(offsets[0, :, None] + torch.arange(h), images.device)  # (B, H)
    cols = to_device_async(offsets[1, :, None] + cols_in_crop, images.device)  # (B, W), flip folded in
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
