"""Exceptions raised by :mod:`nnrelief.data`."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A data file exists but is truncated, corrupted or not in the expected format."""


class ChecksumError(DataFormatError):
    """A data file's md5 checksum differs from the published one."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing and could not be downloaded."""
