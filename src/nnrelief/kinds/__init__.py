"""The table of layer kinds NNrelief prunes (:mod:`.table`) and the conv geometry its conv
scores work on (:mod:`.geometry`)."""

from .geometry import ConvGeometry, regroup, spread_input
from .table import KINDS, ConvKind, ConvTransposeKind, LayerKind, LinearKind, TransposedLinearKind, kind_of, layer_ops, scored_kinds, unscored_reason

__all__ = [
    "KINDS", "ConvGeometry", "ConvKind", "ConvTransposeKind", "LayerKind", "LinearKind", "TransposedLinearKind",
    "kind_of", "layer_ops", "regroup", "scored_kinds", "spread_input", "unscored_reason",
]  # fmt: skip
