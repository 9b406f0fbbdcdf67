"""Text corpora as byte tokens: :class:`TokenStream`, reading checksummed plain-text works
(:func:`read_works`) and cutting a stream into next-token windows (:func:`windows`).

Byte-level tokens need no tokenizer: the vocabulary is the 256 byte values, and the mean
cross-entropy in bits per token is the bits per byte of the text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ChecksumError

BYTE_VOCAB = 256  # token values: the bytes


@dataclass(frozen=True, eq=False)
class TokenStream:
    """One split of a text corpus: its works' bytes, concatenated in order.

    Attributes:
        tokens: uint8 tensor (N,), one token per byte.
        name: registry name of the dataset.
        split: ``"train"``, ``"val"`` or ``"test"``.
        works: the works the stream holds, in order.
    """

    tokens: torch.Tensor
    name: str
    split: str
    works: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.tokens.dtype != torch.uint8 or self.tokens.dim() != 1:
            raise ValueError(f"{self.name}: tokens must be a uint8 tensor (N,), got {self.tokens.dtype} of shape "
                             f"{tuple(self.tokens.shape)}")  # fmt: skip
        if self.tokens.numel() < 2:
            raise ValueError(f"{self.name} ({self.split}): {self.tokens.numel()} tokens, at least 2 needed for one "
                             "next-token target")  # fmt: skip

    def __len__(self) -> int:
        return int(self.tokens.numel())


def _checked_bytes(path: Path, size: int, sha256: str) -> bytes:
    """The bytes of ``path``; :class:`ChecksumError` unless they have ``size`` and ``sha256``."""
    raw = path.read_bytes()
    actual = hashlib.sha256(raw).hexdigest()
    if len(raw) != size or actual != sha256:
        raise ChecksumError(
            f"{path}: {len(raw)} bytes with sha256 {actual}, the corpus ships {size} bytes with sha256 {sha256}: "
            "the file is truncated or modified; restore the original"
        )
    return raw


def read_works(
    root: Path, works: Sequence[str], checksums: Mapping[str, tuple[int, str]], *, name: str, split: str
) -> TokenStream:
    """Read ``<root>/<work>.txt`` for each of ``works`` (each checked against its
    ``(bytes, sha256)`` in ``checksums``) into one stream, the works in the given order and
    joined as they are (no separator)."""
    parts = [_checked_bytes(Path(root) / f"{work}.txt", *checksums[work]) for work in works]
    tokens = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
    return TokenStream(tokens, name, split, tuple(works))


def windows(tokens: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs of the windows beginning at ``starts`` (B,): inputs
    ``tokens[s : s + context]`` and targets ``tokens[s + 1 : s + context + 1]``, both int64
    (B, context) on the tokens' device."""
    index = starts.unsqueeze(1) + torch.arange(context + 1, device=starts.device)
    window = tokens[index].long()
    return window[:, :-1], window[:, 1:]
