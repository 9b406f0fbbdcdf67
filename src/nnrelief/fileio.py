"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A crash mid-write never leaves a half-written checkpoint, history or results file: the
target either keeps its old content or gets the complete new one. The temporary file is
named ``.<stem>.<random>.tmp<suffix>`` after its target (:func:`temporary_name_pattern`)
and holds an ``flock`` while it is written: a temporary file of the same target that nobody
holds is what a killed write left, and the next write of that target removes it.

Write errors that the user can fix (a full disk, a disk quota, the file-size limit, a
read-only or forbidden folder) raise :class:`WriteError` naming the target file and what
to do; the target is unchanged. (``torch.save`` hides the ``OSError`` of a full disk in a
``RuntimeError("unexpected pos ...")`` of its zip writer: the file object it writes to
keeps the original error.)

A folder may have a :class:`WriteRecorder` (:func:`record_writes`): it is told about every
file written there just before the file takes its place and just after (the checksums of
a run folder, :mod:`nnrelief.experiments.checksums`).

One writer: in a torch.distributed run of several processes (``torchrun``) only rank 0
writes; :func:`atomic_write` returns at once on the other ranks. Every file of a run
folder is written through here, so the ranks never race on the same file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import mkstemp
from typing import IO, Any, Protocol

import torch
from torch import Tensor, nn

from .distributed import is_main
from .pruning.masks import state_with_masks

logger = logging.getLogger(__name__)

# errno -> (what is wrong, what to do)
_FIXABLE = {
    errno.ENOSPC: ("the disk is full", "free some space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space"),
    errno.EFBIG: ("the file would exceed the file-size limit", "raise the limit (ulimit -f) or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "make it writable or use another folder"),
    errno.EACCES: ("permission denied", "make the folder writable or use another folder"),
    errno.EPERM: ("operation not permitted", "make the folder writable or use another folder"),
    errno.ENOTDIR: ("a folder on its path is a file", "give a path whose folders are folders"),
    errno.ENOENT: ("its folder was removed or moved while it was written", "restore the folder or give another path"),
}


class WriteError(OSError):
    """A file could not be written for a reason the user can fix (full disk, read-only
    folder, ...); the message names the file and what to do. The file is unchanged."""

    def __init__(self, code: int, target: Path) -> None:
        reason, remedy = _FIXABLE[code]
        super().__init__(code, f"cannot write {target}: {reason} ({os.strerror(code)}); {remedy} and run again "
                               "(the file is unchanged)")  # fmt: skip
        self.target = target

    def __str__(self) -> str:
        return str(self.strerror)


class WriteRecorder(Protocol):
    """Told about each file written into its folder (see :func:`record_writes`)."""

    def will_replace(self, temp: Path, target: Path) -> None:
        """``temp`` holds the complete new content of ``target`` and is about to replace it."""

    def replaced(self, target: Path) -> None:
        """``target`` now holds the new content."""


_RECORDERS: dict[str, WriteRecorder] = {}


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def record_writes(folder: str | os.PathLike[str], recorder: WriteRecorder | None) -> None:
    """Tell ``recorder`` about every file written into ``folder`` from now on (``None``: stop)."""
    if recorder is None:
        _RECORDERS.pop(_key(Path(folder)), None)
    else:
        _RECORDERS[_key(Path(folder))] = recorder


def temporary_name_pattern(name_glob: str) -> re.Pattern[str]:
    """The names :func:`atomic_path` gives the temporary files of targets matching
    ``name_glob`` (a file name where ``*`` stands for a number, e.g. ``model-iter*.pt``)."""
    path = Path(name_glob)
    stem, suffix = (re.escape(part).replace(r"\*", r"\d+") for part in (path.stem, path.suffix))
    return re.compile(rf"\.{stem}\.[a-z0-9_]+\.tmp{suffix}")


def fixable_write_error(error: BaseException, target: Path) -> WriteError | None:
    """``error`` as a :class:`WriteError` naming ``target``, if the user can fix its cause."""
    if isinstance(error, WriteError):
        return error
    if isinstance(error, OSError) and error.errno in _FIXABLE:
        return WriteError(error.errno, target)
    return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_leftovers(target: Path) -> None:
    """Delete the temporary files of ``target`` that killed writes left (those no live
    write holds the ``flock`` of); files of other names are never touched."""
    pattern = re.compile(rf"\.{re.escape(target.stem)}\.[a-z0-9_]+\.tmp{re.escape(target.suffix)}")
    for path in target.parent.glob(".*.tmp*"):
        if not pattern.fullmatch(path.name) or not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a write under way
        finally:
            os.close(fd)
        logger.info("removing %s, left by an interrupted write", path)
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` if the block succeeds
    and is deleted if it raises. Parent folders are created; temporary files of ``path``
    left by killed writes are removed."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target)
        handle, temp = mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}")
    except OSError as error:
        raise fixable_write_error(error, target) or error from None
    os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given
    fcntl.flock(handle, fcntl.LOCK_EX)  # held until the file has replaced its target (or is gone)
    try:
        yield Path(temp)
        recorder = _RECORDERS.get(_key(target.parent))
        if recorder is not None:
            recorder.will_replace(Path(temp), target)
        os.replace(temp, target)
        if recorder is not None:
            recorder.replaced(target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    finally:
        os.close(handle)


class _Keeping:
    """A binary file that keeps the first ``OSError`` of its writes (torch.save replaces it
    by a RuntimeError)."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as error:
            self.error = self.error or error
            raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically through ``write(binary file)``, synced to disk (on rank 0
    only when distributed). Raises :class:`WriteError` for a full disk or a read-only folder."""
    if not is_main():
        return
    target = Path(path)
    with atomic_path(target) as temp, open(temp, "wb") as raw:
        file = _Keeping(raw)
        try:
            write(file)  # type: ignore[arg-type]
            file.flush()
            os.fsync(raw.fileno())
        except (OSError, RuntimeError) as error:
            fixable = fixable_write_error(file.error or error, target)
            if fixable is None:
                raise
            raise fixable from None


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically."""
    atomic_write(path, lambda file: torch.save(obj, file))


def save_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``model``'s state with its pruning masks
    (:func:`nnrelief.pruning.masks.state_with_masks`; load it with ``restore_masks``)."""
    return {key: value.detach().to("cpu", copy=True) for key, value in state_with_masks(model).items()}
