"""Saving models for inference: TorchScript, ``torch.export`` programs, ONNX, sparse storage.

Every exporter refuses a model that still carries nnrelief masks or gates (export
``compact(model, example)`` or ``make_permanent(model)``), writes to a temp file and
renames it, and traces the model in eval mode (its modes are restored afterwards).

Sparse storage (``save_sparse``/``load_sparse``) writes each tensor densely or as uint8
position deltas plus values, whichever is smaller, so the file grows with the number of
remaining weights.
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from ..fileio import atomic_path
from ..pruning.masks import GATE, is_masked

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
SPARSE_FORMAT = "nnrelief-sparse"
SPARSE_VERSION = 1
_MAX_DELTA = 255


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.train(training)


def _check_exportable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if any(is_masked(module, name) for name in module._parameters) or GATE in module._buffers:
            raise ValueError(
                f"module {name or '<root>'} still carries nnrelief masks or gates; "
                "export compact(model, example) (or make_permanent(model)) instead"
            )


def export_torchscript(model: nn.Module, example: Tensor, path: PathLike) -> Path:
    """Save ``model`` (eval mode) as TorchScript traced on ``example``; loads with ``torch.jit.load``."""
    _check_exportable(model)
    with _eval_mode(model), torch.no_grad(), atomic_path(path) as temp:
        torch.jit.save(torch.jit.trace(model, example), str(temp))
    log.info("TorchScript model written to %s", path)
    return Path(path)


def _batch_dim(example: Tensor) -> dict[int, Any]:
    return {0: torch.export.Dim("batch", min=1, max=65536)} if example.shape[0] > 1 else {}


def export_program(model: nn.Module, example: Tensor, path: PathLike) -> Path:
    """Save ``model`` (eval mode) as a ``torch.export`` ExportedProgram (``torch.export.save``).

    The batch dim is dynamic when ``example`` has more than one sample. Load it with
    ``torch.export.load(path).module()``.
    """
    _check_exportable(model)
    with _eval_mode(model), torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(example),))
    with atomic_path(path) as temp:
        torch.export.save(program, str(temp))
    log.info("ExportedProgram written to %s", path)
    return Path(path)


def export_onnx(model: nn.Module, example: Tensor, path: PathLike) -> Path:
    """Save ``model`` (eval mode) as ONNX (input ``input``, output ``output``).

    Needs the optional extra ``nnrelief[export]`` (onnx, onnxscript). The batch dim is
    dynamic when ``example`` has more than one sample.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail early with a clear message)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError("ONNX export needs the optional dependencies: pip install 'nnrelief[export]'") from error
    _check_exportable(model)
    with _eval_mode(model), torch.no_grad(), atomic_path(path) as temp:
        torch.onnx.export(
            model, (example,), str(temp), input_names=["input"], output_names=["output"],
            dynamic_shapes=(_batch_dim(example),), dynamo=True, external_data=False, verbose=False,
        )
    log.info("ONNX model written to %s", path)
    return Path(path)


def _encode(tensor: Tensor) -> dict[str, Any]:
    """Dense, or uint8 deltas between nonzero positions plus their values (smaller wins).

    A gap longer than 255 is bridged by filler entries (delta 255, value 0).
    """
    tensor = tensor.detach().cpu()
    flat = tensor.reshape(-1)
    dense = {"kind": "dense", "data": tensor.clone()}
    if not tensor.is_floating_point() or flat.numel() == 0:
        return dense
    positions = flat.nonzero().flatten()
    gaps = torch.diff(positions, prepend=positions.new_full((1,), -1))
    fillers = (gaps - 1) // _MAX_DELTA
    entries = int(positions.numel() + fillers.sum())
    if entries * (1 + flat.element_size()) >= flat.numel() * flat.element_size():
        return dense
    ends = torch.cumsum(fillers + 1, 0) - 1
    deltas = torch.full((entries,), _MAX_DELTA, dtype=torch.long)
    deltas[ends] = gaps - fillers * _MAX_DELTA
    values = torch.zeros(entries, dtype=flat.dtype)
    values[ends] = flat[positions]
    return {"kind": "delta8", "shape": tuple(tensor.shape), "deltas": deltas.to(torch.uint8), "values": values}


def _decode(entry: dict[str, Any]) -> Tensor:
    if entry["kind"] == "dense":
        return entry["data"]
    values = entry["values"]
    out = torch.zeros(int(torch.tensor(entry["shape"]).prod()), dtype=values.dtype)
    positions = torch.cumsum(entry["deltas"].long(), 0) - 1
    out[positions] = values
    return out.reshape(entry["shape"])


def save_sparse(model: nn.Module, path: PathLike) -> Path:
    """Save a (compacted) model so the file grows with its number of nonzero entries.

    The file (``torch.save``) holds the module structure with empty tensors and, per
    parameter/buffer, either the dense tensor or uint8 position deltas plus nonzero values.
    Masked models are refused: compact (or ``make_permanent``) them first.
    """
    _check_exportable(model)
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    memo: dict[int, Any] = {}
    for tensor in tensors.values():
        empty = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    skeleton = copy.deepcopy(model, memo)
    payload = {
        "format": SPARSE_FORMAT,
        "version": SPARSE_VERSION,
        "module": skeleton,
        "tensors": {name: _encode(tensor) for name, tensor in tensors.items()},
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return Path(path)


def _slot(model: nn.Module, name: str) -> Tensor:
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def load_sparse(path: PathLike, map_location: str | torch.device | None = None) -> nn.Module:
    """Load a model written by :func:`save_sparse`.

    The file contains a pickled module: load only files you trust (``weights_only=False``).
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != SPARSE_FORMAT:
        raise ValueError(f"{path} is not an nnrelief sparse model file")
    if payload["version"] > SPARSE_VERSION:
        raise ValueError(f"{path}: sparse format version {payload['version']} is newer than supported ({SPARSE_VERSION})")
    model: nn.Module = payload["module"]
    restored: dict[int, Tensor] = {}
    for name, entry in payload["tensors"].items():
        placeholder, tensor = _slot(model, name), _decode(entry)
        if isinstance(placeholder, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=placeholder.requires_grad)
        restored[id(placeholder)] = tensor
    for module in model.modules():  # every slot holding a placeholder (tied tensors included)
        for store in (module._parameters, module._buffers):
            for leaf, placeholder in store.items():
                if placeholder is not None and id(placeholder) in restored:
                    store[leaf] = restored[id(placeholder)]
    return model.to(map_location) if map_location is not None else model
