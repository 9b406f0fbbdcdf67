"""NNrelief: neural-activity-based pruning for any PyTorch model.

``nnrelief.prune(model, batches)`` runs one pruning pass in place and returns a report;
``nnrelief.relieve`` runs the iterative prune -> retrain procedure with your train function
(its passes' settings one ``PassSettings``, the keywords of ``prune``);
``compact(model, example)`` returns a physically smaller model with the same outputs;
``restore_masks`` loads a pruned checkpoint into a fresh model; ``make_permanent`` folds
the masks into plain weights; ``state_dict``/``load_state_dict`` save a compacted (or masked)
model and load it back into a fresh instance of its own class.
"""

import importlib
import sys

from .compaction import compact
from .compaction.statedict import load_state_dict, state_dict
from .experiments.iterative import relieve
from .pruning.masks import make_permanent, restore_masks
from .pruning.pass_settings import PassSettings
from .pruning.prune import prune
from .pruning.report import LayerReport, PruneReport

__all__ = [
    "prune", "relieve", "compact", "restore_masks", "make_permanent", "state_dict", "load_state_dict", "PassSettings", "PruneReport",
    "LayerReport",
]  # fmt: skip
__version__ = "0.1.0"

# Modules that moved into the pruning and compaction packages keep their old names, so
# imports and pickled files (sparse and whole-module files hold nnrelief.narrowing.ChannelMap)
# written before the move still resolve.
_MOVED = {
    "scores": "pruning.scores", "selection": "pruning.selection", "stats": "pruning.stats", "cleaning": "pruning.cleaning",
    "masks": "pruning.masks", "report": "pruning.report", "choices": "pruning.choices", "diagnostics": "pruning.diagnostics",
    "narrowing": "compaction.narrowing", "indexmaps": "compaction.indexmaps", "export": "compaction.export",
    "opmetrics": "compaction.opmetrics",
}  # fmt: skip
for _old, _new in _MOVED.items():
    sys.modules[f"{__name__}.{_old}"] = importlib.import_module(f".{_new}", __name__)
