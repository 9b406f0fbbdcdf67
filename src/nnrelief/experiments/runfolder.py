"""A run folder and every file in it: :class:`RunFolder`.

Files of a run folder (all written atomically: temporary file + ``os.replace``):

==========================  ==============================================================
``config.json``             the :class:`~nnrelief.experiments.config.ExperimentConfig`
``init.pt``                 initial weights (plain ``state_dict``)
``dense.ckpt``              per-epoch checkpoint of the dense training (removed when done)
``trained.pt``              the dense trained weights
``retrain-<k>.ckpt``        per-epoch checkpoint of retraining in iteration k (removed)
``relief_state.pt``         the loop's state: model with masks, history, pending record
``model-iter<k>.pt``        weights and masks after iteration k (load with ``restore_masks``)
``history.csv/.json``       one row per iteration (iteration 0 = the dense model)
``.lock``                   the id of the process writing the run (see below)
``compare/<method>/``       a baseline's run of ``nnrelief compare`` (the same files)
==========================  ==============================================================

Reading a run never writes to it. :meth:`RunFolder.open_for_writing` takes the folder's
lock (``fcntl.flock`` on ``.lock``, which holds the writer's process id: a second writer
is told which process holds it; the kernel drops the lock of a killed process, so a
stale lock file never blocks) and removes temporary files left by killed writes. Files
whose content would not change are not rewritten, so resuming a finished run writes
nothing.

Under ``torchrun`` (several processes, :mod:`nnrelief.distributed`) rank 0 alone touches
the folder: it alone takes the lock, removes files and writes; every read runs on rank 0
and its result (or error) reaches all ranks (:func:`~nnrelief.distributed.from_main`), so
the reading methods must be called on every rank alike, and the folder need exist on rank
0's machine only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..distributed import from_main, is_main
from ..fileio import save_text, save_torch
from .history import History

logger = logging.getLogger(__name__)

CONFIG = "config.json"
INIT = "init.pt"
TRAINED = "trained.pt"
DENSE_CHECKPOINT = "dense.ckpt"
STATE = "relief_state.pt"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
LOCK = ".lock"
_TEMP_GLOB = ".*.tmp*"  # the temporary names of nnrelief.fileio.atomic_path
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)

# Locks this process holds: resolved folder -> [lock file descriptor, number of holders].
_HELD: dict[Path, list[int]] = {}


class RunFolderError(ValueError):
    """A file of a run folder cannot be used; the message names it and what to do."""


class RunLockedError(RunFolderError):
    """Another process is writing the run folder."""


def model_file(iteration: int) -> str:
    """Name of the weights after ``iteration``."""
    return f"model-iter{iteration}.pt"


def retrain_checkpoint(iteration: int | str) -> str:
    """Name of the per-epoch checkpoint of retraining in ``iteration``."""
    return f"retrain-{iteration}.ckpt"


RETRAIN_CHECKPOINTS = retrain_checkpoint("*")  # glob of all of them


class RunFolder:
    """The files of one run folder (see the module docstring).

    ``RunFolder(path)`` only reads; :meth:`open_for_writing` (or ``with
    RunFolder(path).open_for_writing() as folder:``) locks it for writing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_key: Path | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ reading

    def exists(self, name: str) -> bool:
        """Whether the folder holds ``name``."""
        return from_main((self.path / name).exists)

    def is_unused(self) -> bool:
        """Whether the folder is missing or holds nothing but a lock and temporary files."""
        return from_main(self._is_unused)

    def _is_unused(self) -> bool:
        if not self.path.exists():
            return True
        temporary = set(self.path.glob(_TEMP_GLOB))
        return all(entry.name == LOCK or entry in temporary for entry in self.path.iterdir())

    def read_json(self, name: str) -> Any:
        """The JSON content of ``name``; a damaged file raises :class:`RunFolderError`."""
        return from_main(self._read_json, name)

    def _read_json(self, name: str) -> Any:
        path = self.path / name
        remedy = "run the same command again to rewrite it from the run's state" if name == HISTORY_JSON else "restore it"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunFolderError(f"{path} is damaged ({error}); {remedy}, or delete the run folder to start over") from None

    def read_history(self) -> History:
        """The run's ``history.json``."""
        data = self.read_json(HISTORY_JSON)
        try:
            history = History.from_dict(data)
        except (KeyError, TypeError, ValueError) as error:
            raise RunFolderError(
                f"{self.path / HISTORY_JSON} is not a history ({type(error).__name__}: {error}); run the same command "
                "again to rewrite it from the run's state"
            ) from None
        if not history.records:
            raise RunFolderError(f"{self.path / HISTORY_JSON} has no iterations")
        return history

    def load(self, name: str) -> Any:
        """A tensor file of the folder (``torch.load``, tensors only, on CPU)."""
        return from_main(self._load, name)

    def _load(self, name: str) -> Any:
        path = self.path / name
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever makes the file unreadable, the remedy is the same
            raise RunFolderError(
                f"{path} cannot be read ({type(error).__name__}): it is damaged or was not written by nnrelief; "
                "delete it (or the run folder) to compute it again"
            ) from None

    def check_readable(self, name: str) -> None:
        """Raise :class:`RunFolderError` if ``name`` exists but :meth:`load` cannot read it
        (before a checkpoint is handed to code that would fail less clearly)."""
        from_main(self._check_readable, name)

    def _check_readable(self, name: str) -> None:
        if (self.path / name).exists():
            self._load(name)  # the tensors stay on rank 0

    # ------------------------------------------------------------------ writing

    def open_for_writing(self) -> RunFolder:
        """Create the folder, take its lock and remove temporary files of killed writes.

        Raises :class:`RunLockedError` naming the process that holds the lock. A folder
        this process may not write is opened without a lock (nobody can write it).
        Returns ``self``; :meth:`close` (or the end of a ``with`` block) releases the lock.
        Under torchrun only rank 0 opens the folder (the other ranks never write to it).
        """
        if self._lock_key is None and is_main():
            self._lock_key = self._lock()
            if self._lock_key is not None:
                self._remove_temporary()
        return self

    def close(self) -> None:
        """Release this object's hold on the lock. The lock file stays, emptied: only a
        process that died holding the lock leaves its pid there."""
        key, self._lock_key = self._lock_key, None
        if key is None or key not in _HELD:
            return
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            fd = _HELD.pop(key)[0]
            os.ftruncate(fd, 0)
            os.close(fd)

    def __enter__(self) -> RunFolder:
        return self.open_for_writing()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def write_text(self, name: str, text: str) -> None:
        """Write ``name`` atomically, unless it already holds exactly ``text`` (rank 0 only)."""
        if not is_main():
            return
        path = self.path / name
        try:
            if path.read_text(encoding="utf-8") == text:
                return
        except (OSError, UnicodeDecodeError):
            pass
        save_text(text, path)

    def write_json(self, name: str, data: Any) -> None:
        """Write ``data`` as indented JSON (no NaN/inf) through :meth:`write_text`."""
        self.write_text(name, json.dumps(data, indent=2, allow_nan=False) + "\n")

    def write_history(self, history: History, extra: Mapping[str, Any] | None = None) -> None:
        """Write ``history.csv`` and ``history.json`` (plus ``extra`` keys) where they changed."""
        self.write_text(HISTORY_CSV, history.to_csv())
        self.write_json(HISTORY_JSON, history.to_json(extra))

    def save(self, name: str, obj: Any) -> None:
        """``torch.save`` ``obj`` as ``name`` atomically."""
        save_torch(obj, self.path / name)

    def remove(self, pattern: str, keep: str | None = None) -> None:
        """Delete the files matching the glob ``pattern`` (but ``keep``; rank 0 only)."""
        if not is_main():
            return
        for path in self._matching(pattern):
            if path.name != keep:
                path.unlink(missing_ok=True)

    def _matching(self, pattern: str) -> Iterator[Path]:
        return self.path.glob(pattern) if self.path.exists() else iter(())

    def _remove_temporary(self) -> None:
        for path in self.path.rglob(_TEMP_GLOB):
            if path.is_file():
                logger.info("removing %s, left by an interrupted write", path)
                path.unlink(missing_ok=True)

    def _lock(self) -> Path | None:
        self.path.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            return key
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            if error.errno not in _READ_ONLY:
                raise
            logger.debug("%s is read-only: opened without a lock", self.path)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunLockedError(
                f"run folder {self.path} is in use by process {holder or '(unknown)'}; wait for that run to "
                "finish or stop it, or choose another --run-dir"
            ) from None
        previous = _read_pid(fd)
        if previous is not None and previous != os.getpid() and not _alive(previous):
            logger.info("stale lock of process %d (no longer running) in %s taken over", previous, self.path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = [fd, 1]
        return key


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
