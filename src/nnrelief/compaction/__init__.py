"""Physically smaller models and the files they are written to.

:mod:`.compactor` (``compact()``: the routes and their checks) narrows the user's own class in
place (:mod:`.narrowing`) or, where the forward does not allow it, builds a graph module
with channel index maps (:mod:`.indexmaps`); :mod:`.export` writes ONNX, TorchScript,
``torch.export`` and sparse files; :mod:`.statedict` saves a compacted (or masked) model's
state so that a fresh instance of its class takes it back; :mod:`.opmetrics` counts what a model known only by its
operations (a TorchScript or exported file) costs.
"""

from .compactor import compact, compaction_summary, format_summary

__all__ = ["compact", "compaction_summary", "format_summary"]
