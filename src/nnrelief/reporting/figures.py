"""What every figure shares: matplotlib on the Agg backend, imported only when a figure is
drawn (the ``plots`` extra), and saving."""

from __future__ import annotations

import logging
from collections.abc import Iterable
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


def percent_axis(axis: Any, values: Iterable[float]) -> None:
    """Ticks of a log-scale percent axis (``axis``: an x or y axis of the plot) as plain
    numbers (``50%``, not ``5 x 10^1``): 1-2-5 per decade, denser when ``values`` span less
    than one."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0]
    narrow = not positive or max(positive) / min(positive) < 10
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}%"))
    axis.set_minor_formatter(NullFormatter())
