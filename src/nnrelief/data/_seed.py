"""Derivation of independent, reproducible random streams from user seeds."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """Hash ``parts`` (e.g. a purpose tag, a seed and an epoch) into a 63-bit seed."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` whose state depends only on ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
