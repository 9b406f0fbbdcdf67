"""What every figure shares: matplotlib on the Agg backend, imported only when a figure is
drawn (the ``plots`` extra), and saving."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_DPI = 120


class MissingPlotDependencyError(RuntimeError):
    """matplotlib is not installed."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise MissingPlotDependencyError(
            "figures need matplotlib: pip install 'nnrelief[plots]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    pyplot().close(fig)
    logger.info("wrote %s", path)
