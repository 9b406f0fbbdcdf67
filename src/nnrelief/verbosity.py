"""Output levels of the ``nnrelief`` command, for its own messages and for what the libraries
it calls say (torch, ONNX, transformers).

Default: the command's warnings and results; ``-v``: its INFO lines (one per epoch, per
iteration, one per model on how it was analysed) and the libraries' warnings (Python
``warnings``, torch's loggers: ``torch.export``, ``torch.onnx``, ``torch._dynamo``, ...);
``-vv``: DEBUG; ``-q``: errors and results only. The libraries' warnings are shown at ``-v``
only: they are about the libraries (deprecations, optional packages missing), not about the
run. Their errors always show.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

# Root loggers of the libraries the command runs; their records below ERROR show at -v only.
LIBRARY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "transformers")
WARNINGS_LOGGER = "py.warnings"  # where logging.captureWarnings sends Python warnings


def level_of(verbose: int, quiet: int) -> int:
    """The level of the ``nnrelief`` loggers: WARNING, INFO with -v, DEBUG with -vv, ERROR with -q."""
    return min(max(logging.WARNING + 10 * (min(quiet, 1) - verbose), logging.DEBUG), logging.ERROR)


@contextlib.contextmanager
def library_messages(shown: bool, handler: logging.Handler) -> Iterator[None]:
    """Meanwhile, Python warnings go to ``handler`` (as ``py.warnings`` records) when
    ``shown``, and nowhere otherwise; the libraries' loggers keep their levels when
    ``shown`` and say nothing below ERROR otherwise (unless ``TORCH_LOGS`` is set: the user
    asked torch for its logs). Everything is restored afterwards."""
    names = [name for name in LIBRARY_LOGGERS if not (name == "torch" and os.environ.get("TORCH_LOGS"))]
    loggers = [logging.getLogger(name) for name in names] if not shown else []
    warned = logging.getLogger(WARNINGS_LOGGER)
    saved = [logger.level for logger in loggers], (warned.level, warned.propagate)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    warned.setLevel(logging.WARNING if shown else logging.ERROR)
    warned.propagate = False
    warned.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        warned.removeHandler(handler)
        warned.setLevel(saved[1][0])
        warned.propagate = saved[1][1]
        for logger, level in zip(loggers, saved[0]):
            logger.setLevel(level)
