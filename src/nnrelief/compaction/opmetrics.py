"""Parameters and MACs of a model known only by the operations it runs (a TorchScript
module, an ExportedProgram's module): what :func:`nnrelief.metrics.summarize` gives a model
built of ``nn.Linear``/``nn.Conv*`` modules.

``torch.utils.flop_counter.FlopCounterMode`` sees every matrix product and convolution of one
forward pass of a zero sample. Each one whose weight operand is a parameter of the model is
a layer, named after that parameter (``fc1.weight`` -> ``fc1``); its dense MACs are the
operation's FLOPs / 2, its sparse MACs those times the share of nonzero weights, as
:mod:`nnrelief.metrics` counts them. Products of two activations (attention scores) are not
counted, like there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ..metrics import ArchitectureSummary, LayerMetrics

_aten = torch.ops.aten
# operation -> (position of its weight operand, kind of layer)
_WEIGHT_OPERAND = {
    _aten.mm: (1, "linear"),
    _aten.addmm: (2, "linear"),
    _aten.convolution: (1, "conv"),
    _aten._convolution: (1, "conv"),
}


def _storage_key(tensor: Tensor) -> tuple[int, int]:
    """The same for a parameter and its views without offset (``weight.t()``)."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset()


def _layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[str, int, int]]:
    """Weight name -> (kind, dense MACs, sparse MACs) of one sample, in the order of first use."""
    owners = {_storage_key(tensor): name for name, tensor in model.named_parameters()}
    layers: dict[str, tuple[str, int, int]] = {}

    def counting(op: Any) -> Callable[..., int]:
        position, kind = _WEIGHT_OPERAND[op]

        def count(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
            flops = flop_registry[op](*args, out_val=out_val, **kwargs)
            weight = args[position]
            name = owners.get(_storage_key(weight))
            if name is not None and weight.numel():
                dense = flops // 2
                sparse = dense // weight.numel() * int(torch.count_nonzero(weight))
                _, before_dense, before_sparse = layers.get(name, (kind, 0, 0))
                layers[name] = (kind, before_dense + dense, before_sparse + sparse)
            return flops

        count._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode passes the tensors, not their shapes
        return count

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    counter = FlopCounterMode(display=False, custom_mapping={op: counting(op) for op in _WEIGHT_OPERAND})
    was_training = model.training
    model.eval()
    try:
        with counter, torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return layers


def op_summary(model: nn.Module, input_shape: tuple[int, ...]) -> ArchitectureSummary:
    """Per-layer and total parameters, MACs and alive channels of ``model`` (any callable
    module with ``named_parameters``, e.g. ``torch.jit.load``'s) for one sample of
    ``input_shape`` (batch dim excluded), found from the operations one forward pass runs."""
    parameters = {name: tensor.detach() for name, tensor in model.named_parameters()}
    layers = []
    for weight_name, (kind, dense, sparse) in _layer_macs(model, input_shape).items():
        name = weight_name.removesuffix(".weight")
        weight, bias = parameters[weight_name], parameters.get(f"{name}.bias")
        tensors = [weight] + ([bias] if bias is not None else [])
        rows = (weight != 0).flatten(1).any(dim=1)
        if bias is not None and bias.shape == rows.shape:
            rows |= bias != 0
        layers.append(LayerMetrics(
            name=name, kind=kind, weight_shape=tuple(weight.shape),
            params_total=sum(t.numel() for t in tensors), params_nonzero=sum(int(torch.count_nonzero(t)) for t in tensors),
            macs_dense=dense, macs_sparse=sparse, channels_alive=int(rows.sum()), channels_total=rows.numel(),
        ))  # fmt: skip
    total = sum(t.numel() for t in parameters.values())
    nonzero = sum(int(torch.count_nonzero(t)) for t in parameters.values())
    return ArchitectureSummary(tuple(input_shape), layers, total, nonzero)
