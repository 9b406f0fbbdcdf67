"""What every figure shares: matplotlib on the Agg backend, imported only when a figure is
drawn (the ``plots`` extra), and saving."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..fileio import atomic_path, fixable_write_error

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
    """Write ``fig`` to ``path`` (format from its extension) through a temporary file, so
    that an interrupted write leaves the previous figure, and close it."""
    try:
        with atomic_path(path) as temp:
            fig.savefig(temp, dpi=_DPI, format=path.suffix.lstrip(".") or None)
    except OSError as error:
        raise fixable_write_error(error, path) or error from None
    finally:
        pyplot().close(fig)
    logger.info("wrote %s", path)


def _log_ticks(axis: Any, values: Iterable[float], text: Callable[[float], str], narrow_subs: tuple[float, ...]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0]
    narrow = not positive or max(positive) / min(positive) < 10
    axis.set_major_locator(LogLocator(base=10, subs=narrow_subs if narrow else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _pos: text(value)))
    axis.set_minor_formatter(NullFormatter())


def percent_axis(axis: Any, values: Iterable[float]) -> None:
    """Ticks of a log-scale percent axis (``axis``: an x or y axis of the plot) as plain
    numbers (``50%``, not ``5 x 10^1``): 1-2-5 per decade, denser when ``values`` span less
    than one."""
    _log_ticks(axis, values, lambda value: f"{value:g}%", (1.0, 1.5, 2.0, 3.0, 5.0, 7.0))


def count_text(value: float) -> str:
    """``1234 -> '1.23K'``, ``40551424 -> '40.6M'``: a count (MACs) at a readable scale."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def count_axis(axis: Any, values: Iterable[float]) -> None:
    """Ticks of a log-scale count axis (MACs) as ``20M``, ``500K``: 1-2-5 per decade, denser
    (1, 1.5, 2, 3, 4, 5, 6, 8) when ``values`` span less than one."""
    _log_ticks(axis, values, count_text, (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0))
