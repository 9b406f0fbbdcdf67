"""Parameter counts, sparse-aware MACs, alive channels and file sizes of a model.

All counts read the tensors the forward uses (nnrelief zeroes pruned entries in place), so a
masked model, the same model after ``make_permanent`` and its compacted version give the
same nonzero counts.

Compute is counted in multiply-accumulates (MACs) of the Linear and convolution layers
only (one MAC = one multiplication and one addition; bias additions, BatchNorm,
activations and pooling are not counted). ``macs_dense`` counts every weight of a layer,
``macs_sparse`` only its nonzero weights: a conv weight is used once per output position,
a Linear weight once per input row (per sample).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from .pruning.masks import current_mask, gate_of, is_masked

_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


class MaskMismatchError(ValueError):
    """A tensor's mask says an entry is pruned while the entry's value is not zero."""


def effective_tensor(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` as the forward uses it (detached), None if it is not a tensor."""
    tensor = getattr(module, name, None)
    return tensor.detach() if isinstance(tensor, Tensor) else None


def _effective_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(qualified name, detached tensor) of every parameter."""
    for name, parameter in model.named_parameters():
        yield name, parameter.detach()


@dataclass
class LayerMetrics:
    """Counts of one Linear or convolution layer."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    params_total: int
    params_nonzero: int
    macs_dense: int
    macs_sparse: int
    channels_alive: int
    channels_total: int


@dataclass
class ArchitectureSummary:
    """Per-layer and total parameters, MACs and alive channels for one input shape."""

    input_shape: tuple[int, ...]
    layers: list[LayerMetrics]
    all_params_total: int
    all_params_nonzero: int
    gated_channels: dict[str, int] = field(default_factory=dict)

    @property
    def params_total(self) -> int:
        """All weight and bias entries of the Linear/conv layers."""
        return sum(layer.params_total for layer in self.layers)

    @property
    def params_nonzero(self) -> int:
        """Nonzero weight and bias entries of the Linear/conv layers (remaining parameters)."""
        return sum(layer.params_nonzero for layer in self.layers)

    @property
    def macs_dense(self) -> int:
        """MACs of one sample counting every weight."""
        return sum(layer.macs_dense for layer in self.layers)

    @property
    def macs_sparse(self) -> int:
        """MACs of one sample counting only nonzero weights."""
        return sum(layer.macs_sparse for layer in self.layers)

    def architecture(self) -> dict[str, int]:
        """Alive neurons/channels per layer."""
        return {layer.name: layer.channels_alive for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (per-layer entries plus totals)."""
        return {
            "input_shape": list(self.input_shape),
            "layers": [{**asdict(layer), "weight_shape": list(layer.weight_shape)} for layer in self.layers],
            "params_total": self.params_total,
            "params_nonzero": self.params_nonzero,
            "all_params_total": self.all_params_total,
            "all_params_nonzero": self.all_params_nonzero,
            "macs_dense": self.macs_dense,
            "macs_sparse": self.macs_sparse,
            "architecture": self.architecture(),
            "gated_channels": dict(self.gated_channels),
        }

    def table(self) -> str:
        """A fixed-width text table, one row per layer and a total row."""
        header = f"{'layer':<28} {'kind':<6} {'weight shape':<18} {'nonzero params':>20} {'MACs dense':>14} {'MACs sparse':>14} {'alive':>11}"
        lines = [header, "-" * len(header)]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<28} {layer.kind:<6} {'x'.join(map(str, layer.weight_shape)):<18} "
                f"{f'{layer.params_nonzero:,}/{layer.params_total:,}':>20} {layer.macs_dense:>14,} "
                f"{layer.macs_sparse:>14,} {f'{layer.channels_alive}/{layer.channels_total}':>11}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<28} {'':<6} {'':<18} {f'{self.params_nonzero:,}/{self.params_total:,}':>20} "
            f"{self.macs_dense:>14,} {self.macs_sparse:>14,}"
        )
        lines.append(f"all parameters (incl. BatchNorm): {self.all_params_nonzero:,} nonzero / {self.all_params_total:,}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Dense and nonzero entries of Linear/conv weights and biases, and of all parameters.

    Keys: ``layer_total``, ``layer_nonzero`` (Linear/conv weights + biases) and
    ``all_total``, ``all_nonzero`` (every parameter, e.g. BatchNorm too).
    """
    layer_total = layer_nonzero = 0
    for module in model.modules():
        if isinstance(module, _LAYER_TYPES):
            for name in ("weight", "bias"):
                tensor = effective_tensor(module, name)
                if tensor is not None:
                    layer_total += tensor.numel()
                    layer_nonzero += int(torch.count_nonzero(tensor))
    tensors = [tensor for _, tensor in _effective_parameters(model)]
    return {
        "layer_total": layer_total,
        "layer_nonzero": layer_nonzero,
        "all_total": sum(t.numel() for t in tensors),
        "all_nonzero": sum(int(torch.count_nonzero(t)) for t in tensors),
    }


def alive_channels(module: nn.Module) -> tuple[int, int]:
    """(alive, total) output neurons/channels: rows with a nonzero weight or bias."""
    weight = effective_tensor(module, "weight")
    rows = (weight != 0).flatten(1).any(dim=1)
    bias = effective_tensor(module, "bias")
    if bias is not None:
        rows |= bias != 0
    return int(rows.sum()), rows.numel()


def layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """Per Linear/conv layer: (dense MACs, sparse MACs) of ONE sample of ``input_shape``.

    ``input_shape`` excludes the batch dim, e.g. ``(3, 32, 32)``. Output sizes come from
    forward hooks during one forward pass of a zero batch of size 1 in eval mode (the
    model's modes are restored afterwards). A layer called several times is summed.
    """
    macs: dict[str, list[int]] = {}
    handles = []

    def hook(name: str) -> Any:
        def record(module: nn.Module, _inputs: Any, output: Tensor) -> None:
            weight = effective_tensor(module, "weight")
            if isinstance(module, nn.Linear):
                rows = output.numel() // module.out_features
                dense, sparse = rows * weight.numel(), rows * int(torch.count_nonzero(weight))
            else:
                positions = math.prod(output.shape[2:]) * output.shape[0]
                dense, sparse = positions * weight.numel(), positions * int(torch.count_nonzero(weight))
            entry = macs.setdefault(name, [0, 0])
            entry[0] += dense
            entry[1] += sparse
        return record

    for name, module in model.named_modules():
        if isinstance(module, _LAYER_TYPES):
            macs[name] = [0, 0]
            handles.append(module.register_forward_hook(hook(name)))
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    return {name: (dense, sparse) for name, (dense, sparse) in macs.items()}


def summarize(model: nn.Module, input_shape: tuple[int, ...]) -> ArchitectureSummary:
    """Parameters, MACs (dense and sparse) and alive channels per Linear/conv layer."""
    macs = layer_macs(model, input_shape)
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, _LAYER_TYPES):
            continue
        weight = effective_tensor(module, "weight")
        bias = effective_tensor(module, "bias")
        alive, total = alive_channels(module)
        params = [weight] + ([bias] if bias is not None else [])
        layers.append(LayerMetrics(
            name=name,
            kind="linear" if isinstance(module, nn.Linear) else "conv",
            weight_shape=tuple(weight.shape),
            params_total=sum(t.numel() for t in params),
            params_nonzero=sum(int(torch.count_nonzero(t)) for t in params),
            macs_dense=macs[name][0],
            macs_sparse=macs[name][1],
            channels_alive=alive,
            channels_total=total,
        ))
    counts = count_parameters(model)
    gated = {}
    for name, module in model.named_modules():
        gate = gate_of(module)
        if gate is not None:
            gated[name] = int((~gate).sum())
    return ArchitectureSummary(tuple(input_shape), layers, counts["all_total"], counts["all_nonzero"], gated)


def check_masks(model: nn.Module) -> None:
    """Raise :class:`MaskMismatchError` if an entry a mask prunes is not zero (nnrelief keeps
    them zero: a nonzero one means something wrote the weights around the masks)."""
    problems = []
    for prefix, module in model.named_modules():
        for name in ("weight", "bias"):
            if not is_masked(module, name):
                continue
            bad = int((getattr(module, name).detach()[~current_mask(module, name)] != 0).sum())
            if bad:
                problems.append(f"{prefix or '<root>'}.{name}: {bad} entries nonzero where the mask is 0")
    if problems:
        raise MaskMismatchError("mask/weight mismatch: " + "; ".join(problems))


def file_size(path: str | os.PathLike[str]) -> int:
    """Size of the file at ``path`` in bytes."""
    return os.path.getsize(path)
