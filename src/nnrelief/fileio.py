"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A crash mid-write never leaves a half-written checkpoint, history or results file: the
target either keeps its old content or gets the complete new one.

One writer: in a torch.distributed run of several processes (``torchrun``) only rank 0
writes; :func:`atomic_write` returns at once on the other ranks. Every file of a run
folder is written through here, so the ranks never race on the same file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

from .distributed import is_main


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` if the block succeeds
    and is deleted if it raises. Parent folders are created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}")
    os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically through ``write(binary file)``, synced to disk (on rank 0
    only when distributed)."""
    if not is_main():
        return
    with atomic_path(path) as temp, open(temp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically."""
    atomic_write(path, lambda file: torch.save(obj, file))


def save_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``model.state_dict()``."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
