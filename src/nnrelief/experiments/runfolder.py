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
``checksums.json``          the SHA-256 of every other file (:mod:`.checksums`), written first
``compare/<method>/``       a baseline's run of ``nnrelief compare`` (the same files)
==========================  ==============================================================

A folder is taken as a run folder when it holds ``checksums.json``, ``config.json``,
``dense.json`` (a shared dense folder) or ``relief_state.pt`` (folders written before
checksums existed); one that
holds other files and none of these is refused before anything is created or removed in
it, and so is a path that is a file.

Reading a run never writes to it; every read checks the file against its checksum, and a
loaded tensor file must hold finite values (:class:`DamagedFileError` names the file and
what to do). Which damaged files a run rebuilds when run again: ``history.csv/.json``
(from ``relief_state.pt``), the latest ``model-iter<k>.pt`` (the model in
``relief_state.pt``), ``relief_state.pt`` (from that model file and ``history.json``),
``trained.pt`` and ``model-iter0.pt`` (from each other), ``init.pt`` (from the seed, if
that reproduces its checksum), ``config.json`` (from the settings recorded in
``history.json``); a damaged ``*.ckpt`` is dropped and its training phase restarts (same
result). Any other damaged file has to be restored from a copy, or the run started over.

:meth:`RunFolder.open_for_writing` takes the folder's lock (``fcntl.flock`` on ``.lock``,
which holds the writer's process id: a second writer is told which process holds it; the
kernel drops the lock of a killed process, so a stale lock file never blocks), removes the
temporary files that killed writes of the run's own files left in the folder itself (not
in subfolders, which are run folders of their own: ``compare/<method>/`` takes its own
lock and cleans its own), and records the checksums of what is written. Files whose
content would not change are not rewritten, so resuming a finished run writes nothing.

Under ``torchrun`` (several processes, :mod:`nnrelief.distributed`) rank 0 alone touches
the folder: it alone takes the lock, removes files and writes; every read runs on rank 0
and its result (or error) reaches all ranks (:func:`~nnrelief.distributed.from_main`), so
the reading methods must be called on every rank alike, and the folder need exist on rank
0's machine only.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..distributed import from_main, is_main
from ..fileio import fixable_write_error, save_text, save_torch, temporary_name_pattern
from . import checksums
from .checksums import MANIFEST, DamagedFileError, RunFolderError
from .history import History

__all__ = ["DamagedFileError", "RunFolder", "RunFolderError", "RunLockedError", "model_file", "retrain_checkpoint"]

logger = logging.getLogger(__name__)

CONFIG = "config.json"
INIT = "init.pt"
TRAINED = "trained.pt"
DENSE_CHECKPOINT = "dense.ckpt"
DENSE_SETTINGS = "dense.json"  # in a shared dense model's folder (experiments.dense)
STATE = "relief_state.pt"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
LOCK = ".lock"
COMPARE_FILES = ("compare.csv", "compare.json", "compare.md", "compare.png")
# Every name nnrelief writes into a run folder (and into compare/): only temporary files
# of these names are removed, so nothing of anyone else's is touched.
RUN_FILES = (CONFIG, INIT, TRAINED, DENSE_CHECKPOINT, DENSE_SETTINGS, STATE, HISTORY_CSV, HISTORY_JSON, MANIFEST,
             "model-iter*.pt", "retrain-*.ckpt", *COMPARE_FILES)  # fmt: skip
_TEMPORARY = [temporary_name_pattern(name) for name in RUN_FILES]
_MARKERS = (MANIFEST, CONFIG, STATE, DENSE_SETTINGS)  # what makes a folder a run folder (or a shared dense one)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass
class _Hold:
    fd: int
    holders: int
    checksums: checksums.Checksums


# Locks this process holds, by resolved folder.
_HELD: dict[Path, _Hold] = {}


class RunLockedError(RunFolderError):
    """Another process is writing the run folder."""


def model_file(iteration: int) -> str:
    """Name of the weights after ``iteration``."""
    return f"model-iter{iteration}.pt"


def retrain_checkpoint(iteration: int | str) -> str:
    """Name of the per-epoch checkpoint of retraining in ``iteration``."""
    return f"retrain-{iteration}.ckpt"


RETRAIN_CHECKPOINTS = retrain_checkpoint("*")  # glob of all of them


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of a write of one of :data:`RUN_FILES`."""
    return any(pattern.fullmatch(name) for pattern in _TEMPORARY)


def holds_run_file(path: Path) -> bool:
    """Whether ``path`` is (or would replace) a file of the run folder it lies in: a name
    the run writes (:data:`RUN_FILES`, ``.lock``) or one its checksums record."""
    folder = path.parent
    if not any((folder / marker).is_file() for marker in _MARKERS):
        return False
    if path.name == LOCK or any(fnmatch.fnmatchcase(path.name, name) for name in RUN_FILES):
        return True
    try:
        return path.name in checksums.read_entries(folder)
    except DamagedFileError:
        return False  # unverifiable: the names above are the run's


def refuse_overwrite(output: Path, inputs: Iterable[Path], option: str) -> None:
    """Raise :class:`RunFolderError` before anything is written if the output file
    ``output`` (given as ``option``) is one of ``inputs`` or a file of a run folder."""
    resolved = output.resolve()
    if any(resolved == Path(source).resolve() for source in inputs):
        raise RunFolderError(f"{option} {output} is the input file: nnrelief never overwrites its input; "
                             "give another output file")  # fmt: skip
    if holds_run_file(resolved):
        raise RunFolderError(f"{option} {output} is a name of the run's own files in the run folder {output.parent}, "
                             "which nnrelief never replaces: give another file name or folder")  # fmt: skip


def remedy(name: str) -> str:
    """What to do about a damaged run file ``name``."""
    again = "run the same command again to "
    if name in (HISTORY_CSV, HISTORY_JSON):
        return again + "rewrite it from the run's state"
    if name.endswith(".ckpt"):
        return again + "redo its training phase from the start (same result)"
    rebuilt = {
        STATE: "rebuild it from the latest model-iter<k>.pt and history.json",
        INIT: "rebuild it from the seed",
        TRAINED: "rebuild it from model-iter0.pt",
        CONFIG: "rewrite it (its settings are also in history.json)",
        DENSE_SETTINGS: "rewrite it (the shared dense folder's name is the hash of its settings)",
    }
    if name in rebuilt:
        return again + rebuilt[name] + ", or restore it from a copy"
    if name.startswith("model-iter"):
        return again + "rebuild it if it is the run's latest model (from relief_state.pt), or restore it from a copy"
    return "restore it from a copy"


def _named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _named_tensors(value, f"{prefix}[{index}]")


def check_finite(obj: Any, path: Path) -> None:
    """Raise :class:`DamagedFileError` naming the first floating tensor of ``obj`` (read
    from ``path``) that holds NaN or inf."""
    for name, tensor in _named_tensors(obj):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise DamagedFileError(path, f"{path} is damaged: tensor {name!r} holds {bad} non-finite value(s) "
                                         "(NaN or inf)", remedy(path.name))  # fmt: skip


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
        """Whether the folder is missing or holds nothing but a lock, checksums and
        temporary files of the run's own files."""
        return from_main(self._is_unused)

    def _is_unused(self) -> bool:
        if not self.path.is_dir():
            return not self.path.exists()
        return all(entry.name in (LOCK, MANIFEST) or is_temporary(entry.name) for entry in self.path.iterdir())

    def _is_run_folder(self) -> bool:
        return any((self.path / marker).is_file() for marker in _MARKERS)

    def read_bytes(self, name: str) -> bytes:
        """The content of ``name``, checked against its checksum."""
        return from_main(self._read_bytes, name)

    def _read_bytes(self, name: str) -> bytes:
        path = self.path / name
        try:
            data = path.read_bytes()
        except IsADirectoryError:
            raise DamagedFileError(path, f"{path} is a folder, not a file", remedy(name)) from None
        try:
            return checksums.of(self.path).check(name, data)
        except DamagedFileError as error:
            if error.path != path:  # checksums.json itself
                raise
            raise DamagedFileError(path, error.problem, remedy(name)) from None

    def read_json(self, name: str) -> Any:
        """The JSON content of ``name``; a damaged file raises :class:`DamagedFileError`."""
        return from_main(self._read_json, name)

    def _read_json(self, name: str) -> Any:
        path = self.path / name
        data = self._read_bytes(name)
        try:
            return json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DamagedFileError(path, f"{path} is damaged ({error})", remedy(name)) from None

    def read_history(self) -> History:
        """The run's ``history.json``."""
        data = self.read_json(HISTORY_JSON)
        path = self.path / HISTORY_JSON
        try:
            history = History.from_dict(data)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise DamagedFileError(path, f"{path} is not a history ({type(error).__name__}: {error})",
                                   remedy(HISTORY_JSON)) from None  # fmt: skip
        if not history.records:
            raise DamagedFileError(path, f"{path} has no iterations", remedy(HISTORY_JSON))
        return history

    def load(self, name: str) -> Any:
        """A tensor file of the folder (``torch.load``, tensors only, on CPU), checked against
        its checksum and for finite values."""
        return from_main(self._load, name)

    def _load(self, name: str) -> Any:
        path = self.path / name
        data = self._read_bytes(name)
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - whatever makes the file unreadable, the remedy is the same
            raise DamagedFileError(
                path, f"{path} cannot be read ({type(error).__name__}): it is damaged or was not written by nnrelief",
                remedy(name),
            ) from None  # fmt: skip
        check_finite(obj, path)
        return obj

    def damaged(self, name: str) -> DamagedFileError | None:
        """The damage of ``name`` if it exists and :meth:`load` refuses it, else ``None``."""
        return from_main(self._damaged, name)

    def _damaged(self, name: str) -> DamagedFileError | None:
        if not (self.path / name).exists():
            return None
        try:
            self._load(name)  # the tensors stay on rank 0
        except DamagedFileError as error:
            return error
        return None

    def intact(self, name: str) -> bool:
        """Whether ``name`` is there and matches its checksum (a run rebuilds it otherwise)."""
        if not self.exists(name):
            return False
        try:
            self.read_bytes(name)
        except DamagedFileError:
            return False
        return True

    def iterations_done(self) -> int:
        """The retrained iterations ``history.json`` holds (0 if none or unreadable)."""
        try:
            return self.read_history().records[-1].iteration if self.exists(HISTORY_JSON) else 0
        except DamagedFileError:
            return 0

    def finished_history(self, num_iters: int) -> History | None:
        """The run's history if it is finished (``num_iters`` iterations retrained, or stopped
        early) and every file it needs is intact, read without changing anything; else None."""
        if not self.exists(STATE) or not self.exists(HISTORY_JSON):
            return None
        try:  # the loop state, not history.json (written before it), says what is done
            state = self.load(STATE)
            history = History.from_dict(state["history"])
            done = history.records[-1].iteration
            self.read_history()
        except (DamagedFileError, KeyError, TypeError, ValueError, IndexError):
            return None  # the run rebuilds or names what is damaged
        stopped = state.get("phase") == "stopped"
        if not (stopped or done >= num_iters):
            return None
        kept = history.selected_iteration if stopped else done
        needed = (CONFIG, INIT, TRAINED, HISTORY_CSV, model_file(0), model_file(kept))
        return history if all(self.intact(name) for name in needed) else None

    # ------------------------------------------------------------------ writing

    def load_or_rebuild(self, name: str, source: str, fix: str = "restore it from a copy") -> Any:
        """:meth:`load` ``name``; if it is damaged, rebuilt from the file ``source`` holding
        the same tensors (``trained.pt`` from ``model-iter0.pt``); ``fix`` says what to do
        when ``source`` cannot rebuild it either."""
        try:
            return self.load(name)
        except DamagedFileError as damage:
            try:
                state = self.load(source)
            except (DamagedFileError, FileNotFoundError):
                raise DamagedFileError(damage.path, f"{damage.problem}, and {source} cannot rebuild it", fix) from None
            self.rebuild(name, state, damage, source=source)
            return state

    def rebuild(self, name: str, obj: Any, damage: DamagedFileError, *, source: str, exact: bool = True) -> None:
        """Replace the damaged file ``name`` by ``obj`` (made from ``source``). ``exact``:
        only if ``obj`` reproduces the checksum recorded for ``name``; otherwise (and in a
        folder that is not writable) ``damage`` is raised, with the reason."""
        from_main(self._rebuild, name, obj, damage, source, exact)

    def _rebuild(self, name: str, obj: Any, damage: DamagedFileError, source: str, exact: bool) -> None:
        entry = checksums.of(self.path).entry(name)
        if exact and entry is not None:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            if checksums.sha256_of(buffer.getvalue()) != entry["sha256"]:
                raise DamagedFileError(damage.path, f"{damage.problem} (rebuilding it from {source} gave other "
                                                    "content)", "restore it from a copy")  # fmt: skip
        self.require_writable(f"{self.path / name} is damaged")
        logger.warning("%s; rebuilt from %s", damage.problem, source)
        self.save(name, obj)

    def drop_if_damaged(self, name: str) -> None:
        """Remove ``name`` (a training checkpoint) if it is damaged, with a warning: its
        training phase then restarts from the beginning, to the same result."""
        damage = self.damaged(name)
        if damage is not None:
            self.require_writable(f"{self.path / name} is damaged")
            logger.warning("%s; removed: its training phase restarts from the beginning", damage.problem)
            self.remove(name)

    def require_writable(self, work: str) -> None:
        """Raise :class:`RunFolderError` before any work if this process does not hold the
        folder's lock (it was opened read-only) while ``work`` (e.g. "iterations 3-5 are
        left") needs writing."""
        if from_main(lambda: self.path.resolve() not in _HELD):
            raise RunFolderError(f"run folder {self.path} is not writable, and {work}: make it writable (or copy "
                                 "it elsewhere and give that --run-dir) and run again")  # fmt: skip

    def open_for_writing(self) -> RunFolder:
        """Check that the path is a run folder or unused, create it, take its lock, remove
        temporary files of killed writes and record the checksums of what is written.

        Raises :class:`RunFolderError` for a file or a folder of other files (nothing is
        created or removed then), :class:`RunLockedError` naming the process that holds
        the lock. A folder this process may not write is opened without a lock (nobody can
        write it). Returns ``self``; :meth:`close` (or the end of a ``with`` block)
        releases the lock. Under torchrun only rank 0 opens the folder (the other ranks
        never write to it).
        """
        if self._lock_key is None and is_main():
            if self.path.resolve() not in _HELD:
                self._check_is_run_folder()
            self._lock_key = self._lock()
            if self._lock_key is not None and _HELD[self._lock_key].holders == 1:
                try:
                    _HELD[self._lock_key].checksums.start()
                except BaseException:
                    self.close()
                    raise
                self.remove_temporary()
        return self

    def _check_is_run_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} is a file, not a folder: give a new folder or the folder of a run")
        if not self._is_unused() and not self._is_run_folder():
            others = sorted(entry.name for entry in self.path.iterdir())
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise RunFolderError(
                f"{self.path} is not a run folder: it holds other files ({shown}) and no {MANIFEST} or {CONFIG}; "
                "nothing was changed in it: give a new or empty folder, or the folder of a run"
            )

    def close(self) -> None:
        """Release this object's hold on the lock. The lock file stays, emptied: only a
        process that died holding the lock leaves its pid there."""
        key, self._lock_key = self._lock_key, None
        if key is None or key not in _HELD:
            return
        _HELD[key].holders -= 1
        if _HELD[key].holders == 0:
            hold = _HELD.pop(key)
            hold.checksums.stop()
            os.ftruncate(hold.fd, 0)
            os.close(hold.fd)

    def __enter__(self) -> RunFolder:
        return self.open_for_writing()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def write_text(self, name: str, text: str) -> None:
        """Write ``name`` atomically, unless it already holds exactly ``text`` (and matches
        its checksum; rank 0 only)."""
        if not is_main():
            return
        path = self.path / name
        data = text.encode("utf-8")
        try:
            if path.read_bytes() == data:
                checksums.of(self.path).check(name, data)
                return
        except (OSError, DamagedFileError):
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
        """Delete the files matching the glob ``pattern`` (but ``keep``; rank 0 only), then
        their checksums."""
        if not is_main():
            return
        removed = []
        for path in self._matching(pattern):
            if path.name != keep:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        if removed:
            checksums.of(self.path).forget(removed)

    def _matching(self, pattern: str) -> Iterator[Path]:
        return self.path.glob(pattern) if self.path.is_dir() else iter(())

    def remove_temporary(self) -> None:
        """Delete the temporary files that killed writes of :data:`RUN_FILES` left in this
        folder (not in its subfolders). Only while this process writes the folder (its lock,
        or for ``compare/`` its run's lock)."""
        for path in self._matching(".*.tmp*"):
            if is_temporary(path.name) and path.is_file():
                logger.info("removing %s, left by an interrupted write", path)
                path.unlink(missing_ok=True)

    def _lock(self) -> Path | None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise fixable_write_error(error, self.path) or error from None
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key].holders += 1
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
        _HELD[key] = _Hold(fd, 1, checksums.Checksums(self.path))
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
