"""The pruning methods of ``nnrelief compare`` by name: a registry of prune-step strategies.

Each :class:`Method` turns what NNrelief reached after each of its pruning passes
(:class:`Targets`) into the :data:`~nnrelief.experiments.iterative.PruneStep` of a baseline
run, whose iteration k prunes to NNrelief's iteration k (``nnrelief``, the reference, is
run by :meth:`~nnrelief.experiments.experiment.Experiment.run` in the run folder itself).
The methods of :data:`METHODS` and what each prunes to:

{methods}

A new method is one more entry of :data:`METHODS` (this list is made from it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..pruning.prune import SPARED
from ..pruning.report import PruneReport
from .baselines import global_magnitude_prune, magnitude_prune, random_prune
from .config import ConfigError, derive_seed
from .history import History, IterationRecord
from .iterative import PruneStep
from .l1_filter import filter_layers, l1_filter_prune
from .rowwise import row_magnitude_prune, wanda_prune

__all__ = ["METHODS", "Method", "Targets", "get_method", "layer_targets", "with_method_list"]


def layer_targets(record: IterationRecord) -> dict[str, int]:
    """Remaining weights + biases per layer after the pruning pass of ``record``."""
    if record.report is None:
        raise ValueError(f"iteration {record.iteration} has no pruning report (the dense model)")
    return {layer["name"]: layer["weights_kept"] + layer["bias_kept"] for layer in record.report["layers"]}


@dataclass(frozen=True)
class Targets:
    """What NNrelief's pruning passes left, entry k - 1 for iteration k.

    Attributes:
        kept: per layer, the remaining weights + biases.
        macs: the sparse MACs (the history's ``macs_sparse``).
        seed: the run's seed.
        input_shape: one input's shape (for counting MACs).
        spared: the layers NNrelief's ``ignore``/``only`` choices spared (kept whole).
    """

    kept: list[dict[str, int]]
    macs: list[int]
    seed: int
    input_shape: tuple[int, ...]
    spared: frozenset[str] = frozenset()

    @classmethod
    def uniform(cls, totals: dict[str, int], remaining: float, seed: int, input_shape: tuple[int, ...]) -> Targets:
        """One step that keeps the fraction ``remaining`` of every layer (``totals``: all
        weights + biases per layer): the target of a one-shot comparison at sparsity 1 - remaining."""
        kept = {name: round(remaining * total) for name, total in totals.items()}
        return cls([kept], [0], seed, tuple(input_shape))

    @classmethod
    def of(cls, reference: History, seed: int, input_shape: tuple[int, ...]) -> Targets:
        """The targets of NNrelief's history ``reference`` (iteration 0, the dense model, has none)."""
        records = reference.records[1:]
        spared = frozenset(
            name for r in records if r.report is not None for name, why in r.report.get("skipped", {}).items() if why == SPARED
        )
        return cls([layer_targets(r) for r in records], [r.macs_sparse for r in records], seed, tuple(input_shape), spared)


Prune = Callable[[nn.Module, Targets, int, Iterable[Any]], PruneReport]
"""Prunes a model in place for an iteration k to ``targets`` entry k - 1; the last argument is
iteration k's pruning batches (the calibration data of a data-driven method; empty for the others)."""


@dataclass(frozen=True)
class Method:
    """One pruning method of a comparison.

    Attributes:
        name: its name (``--methods``, the ``compare/<name>/`` folder, table columns).
        matches: what it prunes to, one sentence for ``compare.md``.
        prune: the pruning rule of a baseline; ``None`` for ``nnrelief``, the reference.
        default: run when no methods are named.
        equal: what it keeps equal to NNrelief's: ``"weights"`` (counts) or ``"MACs"``.
        data: whether it reads the pruning batches (a data-driven method: Wanda).
        check: raises ``ValueError`` when the method cannot prune a model (given the
            model and one input's shape), before anything runs.
    """

    name: str
    matches: str
    prune: Prune | None = None
    default: bool = True
    check: Callable[[nn.Module, tuple[int, ...]], object] | None = None
    equal: str = "weights"
    data: bool = False

    def step(self, targets: Targets, batches: Callable[[int], Iterable[Any]]) -> PruneStep:
        """The baseline's prune step along ``targets``; ``batches(k)`` gives iteration k's
        pruning batches (called only by a data-driven method)."""
        if self.prune is None:
            raise ValueError(f"{self.name} is the reference: it has no targets to follow")
        prune, data = self.prune, self.data
        return lambda model, iteration: prune(model, targets, iteration, batches(iteration) if data else ())


def _magnitude(model: nn.Module, targets: Targets, iteration: int, _batches: Iterable[Any]) -> PruneReport:
    return magnitude_prune(model, targets.kept[iteration - 1])


def _global_magnitude(model: nn.Module, targets: Targets, iteration: int, _batches: Iterable[Any]) -> PruneReport:
    kept = targets.kept[iteration - 1]
    return global_magnitude_prune(model, sum(kept.values()), list(kept))


def _random(model: nn.Module, targets: Targets, iteration: int, _batches: Iterable[Any]) -> PruneReport:
    generator = torch.Generator().manual_seed(derive_seed(targets.seed, "random-prune", iteration))
    return random_prune(model, targets.kept[iteration - 1], generator)


def _l1_filter(model: nn.Module, targets: Targets, iteration: int, _batches: Iterable[Any]) -> PruneReport:
    return l1_filter_prune(model, targets.macs[iteration - 1], targets.input_shape, targets.spared)


def _row_magnitude(model: nn.Module, targets: Targets, iteration: int, _batches: Iterable[Any]) -> PruneReport:
    return row_magnitude_prune(model, targets.kept[iteration - 1])


def _wanda(norm: str) -> Prune:
    def prune(model: nn.Module, targets: Targets, iteration: int, batches: Iterable[Any]) -> PruneReport:
        return wanda_prune(model, batches, targets.kept[iteration - 1], norm=norm)

    return prune


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("nnrelief", "NNrelief's own pass (the reference)"),
        Method("magnitude", "every layer to NNrelief's remaining count of that layer (largest |w|)", _magnitude),
        Method("global-magnitude", "NNrelief's total remaining count, largest |w| over all layers", _global_magnitude),
        Method("random", "every layer to NNrelief's remaining count of that layer, at random", _random),
        Method("l1-filter", "NNrelief's MACs, by removing one uniform fraction of the filters of the smallest L1 "
               "norm per conv layer (Li et al. 2017; not the stem nor residual-stream convs)",
               _l1_filter, default=False, check=filter_layers, equal="MACs"),
        Method("row-magnitude", "every layer to NNrelief's remaining count of that layer, the same count of the "
               "largest |w| in every output row", _row_magnitude, default=False),
        Method("wanda", "every layer to NNrelief's remaining count of that layer, the same count in every output "
               "row, largest |w_ij| * ||x_j||_2 on the pruning batches (Sun et al. 2023)", _wanda("l2"),
               default=False, data=True),
        Method("wanda-mean", "as wanda, with mean |x_j| (NNrelief's statistic) for ||x_j||_2", _wanda("mean"),
               default=False, data=True),  # fmt: skip
    )
}
"""Every method by name; ``nnrelief`` first."""


def with_method_list(doc: str | None) -> str | None:
    """``doc`` (a docstring; None under ``python -OO``) with ``{methods}`` replaced by the
    methods of :data:`METHODS` as a reST list: name, what it prunes to, whether it runs only when named."""
    listed = "\n".join(f"* ``{m.name}`` - {m.matches}" + ("" if m.default else " (only when named)") for m in METHODS.values())
    return None if doc is None else doc.format(methods=listed)


__doc__ = with_method_list(__doc__)


def get_method(name: str) -> Method:
    """The method called ``name``; :class:`ConfigError` listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
