"""What one pruning pass left: per-layer counts, totals and compression ratio."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch.nn as nn

from ..analysis.layers import kernel_layout
from ..kinds import kind_of
from .masks import current_mask


@dataclass
class LayerReport:
    """Counts of one pruned layer after a pass."""

    name: str
    kind: str
    weights_kept: int
    weights_total: int
    bias_kept: int
    bias_total: int
    channels_alive: int
    channels_total: int
    channels_compacted: int | None = None  # output channels left once compacted (None: no capture)

    @property
    def kept(self) -> int:
        """Kept weights plus kept biases."""
        return self.weights_kept + self.bias_kept

    @property
    def total(self) -> int:
        """All weights plus all biases."""
        return self.weights_total + self.bias_total


@dataclass
class PruneReport:
    """Result of ``nnrelief.prune``: per layer and total remaining parameters."""

    layers: list[LayerReport]
    settings: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    analysis: str = ""  # how the model was analysed: "channel graph" or "connection level: <why>"

    @property
    def kept(self) -> int:
        """Remaining (nonzero-mask) weights and biases of all pruned layers."""
        return sum(layer.kept for layer in self.layers)

    @property
    def total(self) -> int:
        """All weights and biases of the pruned layers."""
        return sum(layer.total for layer in self.layers)

    @property
    def compression(self) -> float:
        """total / kept (inf when nothing is left)."""
        return self.total / self.kept if self.kept else float("inf")

    @property
    def remaining_fraction(self) -> float:
        """kept / total."""
        return self.kept / self.total if self.total else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "layers": [asdict(layer) for layer in self.layers],
            "kept": self.kept,
            "total": self.total,
            "remaining_fraction": self.remaining_fraction,
            "compression": self.compression if self.kept else None,
            "settings": dict(self.settings),
            "skipped": dict(self.skipped),
            "analysis": self.analysis,
        }

    def table(self) -> str:
        """A fixed-width text table, one row per layer and a total row."""
        header = f"{'layer':<28} {'kind':<6} {'weights kept':>20} {'bias kept':>12} {'alive':>11} {'compacted':>9} {'kept %':>7}"
        lines = [header, "-" * len(header)]
        for layer in self.layers:
            share = 100.0 * layer.kept / layer.total if layer.total else 100.0
            compacted = "-" if layer.channels_compacted is None else str(layer.channels_compacted)
            lines.append(
                f"{layer.name:<28} {layer.kind:<6} {f'{layer.weights_kept:,}/{layer.weights_total:,}':>20} "
                f"{f'{layer.bias_kept}/{layer.bias_total}':>12} {f'{layer.channels_alive}/{layer.channels_total}':>11} "
                f"{compacted:>9} {share:>6.2f}%"
            )
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<28} {'':<6} {f'{self.kept:,}/{self.total:,}':>20} {'':>12} {'':>11} {'':>9} "
            f"{100.0 * self.remaining_fraction:>6.2f}%   compression {self.compression:.2f}x"
        )
        for name, reason in self.skipped.items():
            lines.append(f"not pruned: {name} ({reason})")
        if self.analysis.startswith("connection level"):
            lines.append(f"no structure cleaning: {self.analysis}")
        if any(layer.channels_compacted is not None and layer.channels_compacted > layer.channels_alive for layer in self.layers):
            lines.append("alive: output channels with a kept weight; compacted: those compaction keeps (a channel stays while "
                         "any layer of its residual stage or coupled group carries it)")  # fmt: skip
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def layer_report(name: str, module: nn.Module) -> LayerReport:
    """Counts read off the masks of one layer (of a kind of :mod:`nnrelief.kinds`)."""
    weight = current_mask(module, "weight")
    weight = kernel_layout(module, weight)
    bias = current_mask(module, "bias")
    rows = weight.flatten(1).any(dim=1)
    if bias is not None:
        rows = rows | bias
    return LayerReport(
        name=name,
        kind=kind_of(module).family,
        weights_kept=int(weight.sum()),
        weights_total=weight.numel(),
        bias_kept=int(bias.sum()) if bias is not None else 0,
        bias_total=bias.numel() if bias is not None else 0,
        channels_alive=int(rows.sum()),
        channels_total=rows.numel(),
    )


def build_report(
    named_modules: Iterable[tuple[str, nn.Module]], widths: dict[str, int] | None = None, **settings: Any
) -> PruneReport:
    """A report over the given (name, module) pairs; ``widths``: each layer's output channels
    once compacted, where known."""
    layers = [layer_report(name, module) for name, module in named_modules]
    for layer in layers:
        layer.channels_compacted = (widths or {}).get(layer.name)
    return PruneReport(layers, settings=settings)
