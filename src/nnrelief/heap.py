"""Handing the memory a pass or a compaction freed back to the system.

glibc keeps a process's freed heap memory for reuse, so the temporaries of many sizes a
pass frees (scores, selections of blocks of rows, the forward's activations) would stay in
its resident memory after the pass returned. ``malloc_trim`` returns them; no other library
offers it, so it is called through ``ctypes``. Elsewhere (other C libraries, macOS,
Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Callable


@functools.cache
def _trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Collect garbage and give freed heap memory back to the system (glibc only)."""
    gc.collect()
    trim = _trim()
    if trim is not None:
        trim(0)
