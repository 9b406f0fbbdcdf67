"""Output levels: the libraries' warnings (Python warnings, torch's loggers) show at -v only."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import nnrelief
from nnrelief.cli import _logging_to_stderr
from nnrelief.models import lenet300_100
from nnrelief.verbosity import level_of

LIBRARY_LOGGERS = ("torch.onnx._internal.exporter", "torch.export", "torch._dynamo", "transformers.modeling_utils")


def _say_everything() -> dict[str, tuple[bool, bool]]:
    """Emit one message of each kind; per library logger, whether it passes WARNING and ERROR
    records now (torch's loggers write through torch's own handler, to the stderr of its import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # shown each time, whatever filters the test runner set
        warnings.warn("a library deprecation", FutureWarning, stacklevel=1)
    logging.getLogger("nnrelief.pruning").info("nnrelief pass: 10 / 20 weights remain")
    logging.getLogger("nnrelief.cli").warning("a warning of the command")
    loggers = {name: logging.getLogger(name) for name in LIBRARY_LOGGERS}
    return {name: (log.isEnabledFor(logging.WARNING), log.isEnabledFor(logging.ERROR)) for name, log in loggers.items()}


@pytest.mark.parametrize("verbose,quiet", [(0, 0), (1, 0), (0, 1)])
def test_library_warnings_show_at_v_only_and_errors_always(verbose, quiet, capfd, monkeypatch):
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    torch_level = logging.getLogger("torch").level
    with _logging_to_stderr(verbose, quiet):
        passing = _say_everything()
    err = capfd.readouterr().err
    assert ("FutureWarning: a library deprecation" in err) == bool(verbose), err
    assert passing == {name: (bool(verbose), True) for name in LIBRARY_LOGGERS}
    assert ("nnrelief pass" in err) == bool(verbose) and ("a warning of the command" in err) == (not quiet)
    assert logging.getLogger("torch").level == torch_level and not logging.getLogger("py.warnings").handlers


def test_torch_logs_asked_for_are_left_alone(monkeypatch):
    monkeypatch.setenv("TORCH_LOGS", "export")
    with _logging_to_stderr(0, 0):
        assert logging.getLogger("torch.export").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("transformers").isEnabledFor(logging.WARNING)


def test_warnings_are_shown_as_before_afterwards():
    before = warnings.showwarning
    with _logging_to_stderr(0, 0):
        assert warnings.showwarning is not before  # routed to logging meanwhile
    assert warnings.showwarning is before


def test_levels():
    assert [level_of(v, q) for v, q in ((0, 0), (1, 0), (2, 0), (5, 0), (0, 1), (0, 3))] == [
        logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG, logging.ERROR, logging.ERROR,
    ]  # fmt: skip


def _analysed(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "nnrelief.analysis" and "analysed:" in r.getMessage()]


def test_one_info_line_per_model_on_how_it_was_analysed(caplog):
    torch.manual_seed(0)
    models = [lenet300_100(), lenet300_100()]
    with caplog.at_level(logging.DEBUG, logger="nnrelief"):
        for model in models:
            for _ in range(2):  # the second pass reuses the capture (its new masks written into it)
                nnrelief.prune(model, [torch.rand(16, 1, 28, 28)], alpha_fc=0.9, progress=False)
    told = _analysed(caplog)
    assert [r.levelno for r in told] == [logging.INFO, logging.INFO]
    assert told[0].getMessage() == (
        "LeNet300100 analysed: channel graph from torch.export: 3 prunable layers, 0 residual joins, structure cleaning on"
    )
