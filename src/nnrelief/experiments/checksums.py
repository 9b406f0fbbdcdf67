"""The checksums of a run folder: ``checksums.json``, written before every file it names.

torch does not check the CRCs of its zip files, so a checkpoint with garbled bytes loads
(as NaNs or wild values), and a model file copied in from another run loads as well. So
every file a run writes is recorded here with its SHA-256 and size, and every read of a
run file checks it (:meth:`Checksums.check`).

Order of the writes (one atomic write of ``checksums.json`` per file write, synced before
the file is replaced; see :mod:`nnrelief.fileio`)::

    1. the new content is complete in a temporary file
    2. checksums.json gets the entry {"sha256": new, "size": ..., "was": hash on disk now,
                                      "written": the time (Unix seconds)}
    3. the temporary file replaces the file

A kill before 2 leaves the old file and its old entry; a kill between 2 and 3 leaves the
old file, which the entry accepts as ``was``; after 3 the file matches ``sha256``. So no
kill is ever taken for damage. ``was`` is the hash of the file as it was before the write
(``null``: there was none, or it was damaged), and is dropped at the next write of the
folder once the replace is known to be done: a restored older copy of the last-written
file is the one content accepted besides the current one. ``written`` travels with the
folder where file times do not (a copy, a git checkout): :func:`written_at`.

A file without an entry (a folder written before checksums existed, or a file some
command other than the run put there) is accepted unchecked; its tensors are still
checked for finite values when loaded. An entry whose file is missing means the file is
absent (a removal is forgotten after the file is gone). ``checksums.json`` checks itself
(the SHA-256 of its entries); a damaged one names itself: delete it to accept the files
unverified.

A reader racing a writer may see the new file with the old checksums: a mismatch is
checked again against the checksums as they are then, before the file is called damaged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..fileio import record_writes, save_text

logger = logging.getLogger(__name__)

MANIFEST = "checksums.json"
_FORMAT = "nnrelief-checksums 1"
_RETRIES = 3


class RunFolderError(ValueError):
    """A file of a run folder cannot be used; the message names it and what to do."""


class DamagedFileError(RunFolderError):
    """A run file does not match its checksum, cannot be parsed, or holds non-finite
    weights: ``path`` is the file, ``problem`` what is wrong; the message adds what to do."""

    def __init__(self, path: Path, problem: str, remedy: str = "") -> None:
        super().__init__(f"{problem}; {remedy}" if remedy else problem)
        self.path, self.problem = path, problem


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _file_hash(path: Path) -> tuple[str, int]:
    """SHA-256 and size of the file at ``path``, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _entries_digest(files: dict[str, Any]) -> str:
    return sha256_of(json.dumps(files, sort_keys=True).encode())


def read_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """The entries of ``folder/checksums.json`` by file name (none without the file)."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError):
        data = None
    files = data.get("files") if isinstance(data, dict) and data.get("format") == _FORMAT else None
    if not isinstance(files, dict) or data.get("sha256") != _entries_digest(files):
        raise DamagedFileError(
            path, f"{path} is damaged, so the run's files cannot be verified", "delete it to accept them unverified "
            "(their weights are still checked for finite values), then run the command again",
        )  # fmt: skip
    return files


def written_at(folder: str | os.PathLike[str], name: str) -> float | None:
    """When ``name`` was last written into ``folder`` (Unix seconds, as recorded in its
    checksums); ``None`` if that was not recorded (no entry, or one written before the
    times were)."""
    written = read_entries(Path(folder)).get(name, {}).get("written")
    return float(written) if isinstance(written, (int, float)) else None


def of(folder: str | os.PathLike[str]) -> Checksums:
    """The checksums of ``folder``: its writer's (in this process), else read from disk."""
    return _WRITING.get(os.path.realpath(folder)) or Checksums(folder)


def _accepts(entry: dict[str, Any] | None, digest: str) -> bool:
    return entry is None or digest in (entry.get("sha256"), entry.get("was"))


_WRITING: dict[str, Checksums] = {}  # folders this process writes -> their checksums


class Checksums:
    """The checksums of one folder: :meth:`check` for readers; while the folder is open
    for writing, the :class:`~nnrelief.fileio.WriteRecorder` of its writes (:meth:`start`)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._entries: dict[str, dict[str, Any]] | None = None  # loaded when first needed
        self._confirmed: set[str] = set()  # names whose replace finished in this process
        self._writing = False

    # ------------------------------------------------------------------ reading

    def entry(self, name: str) -> dict[str, Any] | None:
        """The recorded entry of ``name`` (``None``: unrecorded)."""
        return self._load().get(name)

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = read_entries(self.folder)
        return self._entries

    def check(self, name: str, data: bytes) -> bytes:
        """``data`` (the content of ``name``) if it matches its entry; else the file read
        again if a writer replaced it meanwhile; raises :class:`DamagedFileError` otherwise."""
        digest = sha256_of(data)
        entries = self._load()
        for _ in range(_RETRIES):
            if _accepts(entries.get(name), digest):
                return data
            if self._writing:
                break
            again = read_entries(self.folder)
            if again == entries:
                break
            self._entries = entries = again
            data = (self.folder / name).read_bytes()
            digest = sha256_of(data)
        path = self.folder / name
        raise DamagedFileError(path, f"{path} is damaged or was replaced: it does not match its checksum in "
                                     f"{self.folder / MANIFEST}")  # fmt: skip

    # ------------------------------------------------------------------ writing

    def start(self) -> None:
        """Record every write into the folder from now on (the folder's writer only)."""
        self._load()  # a damaged checksums.json stops the writer before it writes
        self._writing = True
        record_writes(self.folder, self)
        _WRITING[os.path.realpath(self.folder)] = self

    def stop(self) -> None:
        """Stop recording."""
        record_writes(self.folder, None)
        _WRITING.pop(os.path.realpath(self.folder), None)
        self._writing = False

    def will_replace(self, temp: Path, target: Path) -> None:
        """Record the new content of ``target`` (step 2 of the module docstring)."""
        name = target.name
        if name == MANIFEST:
            return
        entries = self._load()
        digest, size = _file_hash(temp)
        entries[name] = {"sha256": digest, "size": size, "was": self._hash_on_disk(name), "written": time.time()}
        self._confirmed.discard(name)
        self._save()

    def replaced(self, target: Path) -> None:
        """``target`` holds what its entry says (its ``was`` goes at the next write)."""
        self._confirmed.add(target.name)

    def forget(self, names: list[str]) -> None:
        """Drop the entries of removed files."""
        entries = self._load()
        self._confirmed.difference_update(names)
        if any(name in entries for name in names):
            for name in names:
                entries.pop(name, None)
            self._save()

    def _hash_on_disk(self, name: str) -> str | None:
        """The hash of ``name`` as it is now, if it is a valid version (else ``None``)."""
        entry = self._load().get(name)
        if name in self._confirmed and entry is not None:
            return entry["sha256"]
        try:
            digest = _file_hash(self.folder / name)[0]
        except FileNotFoundError:
            return None
        return digest if _accepts(entry, digest) else None

    def _save(self) -> None:
        entries = self._load()
        for name in self._confirmed:
            if name in entries:
                entries[name]["was"] = None
        payload = {"format": _FORMAT, "files": entries, "sha256": _entries_digest(entries)}
        save_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", self.folder / MANIFEST)
        _sync_folder(self.folder)


def _sync_folder(folder: Path) -> None:
    """Make the folder's renames durable (checksums.json before the file it names)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems cannot sync a folder: the renames are theirs to order
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
