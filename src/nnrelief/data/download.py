"""Checksums, downloads to temporary files, and safe archive extraction."""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from .errors import ChecksumError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
TIMEOUT_S = 60.0


class DownloadError(RuntimeError):
    """No URL delivered a file with the expected checksum."""


def md5sum(path: str | os.PathLike[str]) -> str:
    """Hex md5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` when ``path``'s md5 is not ``expected``."""
    actual = md5sum(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: md5 {actual} does not match the published {expected}; the file is "
            f"corrupted, truncated or not the original distribution (delete it and fetch "
            f"it again)"
        )


def _fetch_one(url: str, dest: Path, md5: str) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None,
                  leave=False) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != md5:
        raise ChecksumError(f"downloaded md5 {digest.hexdigest()} != expected {md5}")


def fetch(urls: tuple[str, ...], md5: str, directory: Path) -> Path:
    """Download the first URL that works into a temporary file in ``directory``.

    The file's md5 is checked while streaming; the caller renames or deletes the
    returned temporary file.

    Raises:
        DownloadError: every URL failed; the message lists each URL with its error.
    """
    errors = []
    for url in urls:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".download-")
        os.close(fd)
        tmp = Path(name)
        logger.info("downloading %s", url)
        try:
            _fetch_one(url, tmp, md5)
        except (OSError, ChecksumError) as exc:  # URLError, timeouts, HTTP errors are OSError
            tmp.unlink(missing_ok=True)
            logger.warning("download of %s failed: %s", url, exc)
            errors.append(f"{url}: {exc}")
            continue
        return tmp
    raise DownloadError("; ".join(errors))


def _safe_tar_members(tar: tarfile.TarFile, target: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        resolved = (target / m.name).resolve()
        if not (m.isfile() or m.isdir()) or not resolved.is_relative_to(target.resolve()):
            raise tarfile.TarError(f"unsafe archive member {m.name!r}")
    return members


def extract_archive(archive: Path, target: Path) -> None:
    """Extract a .tar(.gz) or .zip archive into ``target``, refusing paths outside it."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)  # zipfile strips absolute paths and '..' components
        return
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
        else:  # Python < 3.10.12 / 3.11.4: no extraction filters
            tar.extractall(target, members=_safe_tar_members(tar, target))
