"""NNrelief: neural-activity-based pruning for any PyTorch model.

``nnrelief.prune(model, batches)`` runs one pruning pass in place and returns a report;
``nnrelief.relieve`` runs the iterative prune -> retrain procedure with your train function;
``compact(model, example)`` returns a physically smaller model with the same outputs;
``restore_masks`` loads a pruned checkpoint into a fresh model; ``make_permanent`` folds
the masks into plain weights.
"""

from .compaction import compact
from .experiments.iterative import relieve
from .masks import make_permanent, restore_masks
from .pruning import prune
from .report import LayerReport, PruneReport

__all__ = ["prune", "relieve", "compact", "restore_masks", "make_permanent", "PruneReport", "LayerReport"]
__version__ = "0.1.0"
