"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Directory of the real datasets in their original formats.

    ``$NNRELIEF_SHARED_DATA`` if set, else ``<repo root>/../shared/data``. When it is
    missing the test fails if ``$CI`` is set (non-empty), and is skipped otherwise.
    """
    env = os.environ.get("NNRELIEF_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        message = f"shared data directory {path} not found (set NNRELIEF_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in every test (restored afterwards): the test models are tiny, and
    on a busy 2-core machine OpenMP synchronisation dominates their small ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
