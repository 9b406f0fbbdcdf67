"""NNrelief: neural-activity-based pruning for any PyTorch model.

``nnrelief.prune(model, batches)`` runs one pruning pass in place and returns a report;
``restore_masks`` loads a pruned checkpoint into a fresh model; ``make_permanent`` folds
the masks into plain weights.
"""

from .masks import make_permanent, restore_masks
from .pruning import prune
from .report import LayerReport, PruneReport

__all__ = ["prune", "restore_masks", "make_permanent", "PruneReport", "LayerReport"]
__version__ = "0.1.0"
