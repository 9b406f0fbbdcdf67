"""Figures and the Markdown report of NNrelief run folders (``nnrelief report``), one module
per figure family:

* :mod:`.connections` - Figure 2: the network before and after pruning, connections
  coloured by their importance (:func:`plot_connections`, :func:`connection_scores`);
* :mod:`.architecture` - Figure 3: alive neurons/channels per layer and iteration;
* :mod:`.accuracy` - Figures 4-5: accuracy and remaining weights across iterations, and
  the comparison of pruning methods (:func:`plot_comparison`);
* :mod:`.markdown` - :func:`write_report`: all of them plus the tables, as ``report.md``.

matplotlib (the ``plots`` extra) is imported only when a figure is drawn, with the Agg
backend, so the rest of the package does not need it.
"""

from .accuracy import plot_accuracy, plot_comparison, plot_one_shot
from .architecture import plot_architecture
from .connections import ConnectionScores, connection_scores, plot_connections, pruning_inputs
from .figures import MissingPlotDependencyError
from .markdown import history_markdown, write_report
from .runs import RunData, load_run

__all__ = [
    "ConnectionScores",
    "MissingPlotDependencyError",
    "RunData",
    "connection_scores",
    "history_markdown",
    "load_run",
    "plot_accuracy",
    "plot_architecture",
    "plot_comparison",
    "plot_connections",
    "plot_one_shot",
    "pruning_inputs",
    "write_report",
]
