"""Saving models for inference: TorchScript, ``torch.export`` programs, ONNX, sparse storage.

Every exporter refuses a model that still carries nnrelief masks or gates (export
``compact(model, example)`` or ``make_permanent(model)``), writes to a temp file and
renames it, and traces the model in eval mode (its modes are restored afterwards).

Sparse storage (``save_sparse``/``load_sparse``) writes each tensor densely or as uint8
position deltas plus values, whichever is smaller, so the file grows with the number of
remaining weights. The file (format 2) holds tensors, strings and numbers only: it loads
with ``torch.load(weights_only=True)``, into a model of the compacted shapes the caller
gives. Format 1 files (nnrelief before format 2) pickle the module itself: they load only
with ``trust=True``, since unpickling can run code stored in the file.
"""

from __future__ import annotations

import logging
import os
import pickle
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
SPARSE_VERSION = 2
_TRUST_HINT = "pass trust=True (nnrelief eval/report: --trust-file) only for a file you trust"
_MAX_DELTA = 255


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, each module's own mode restored after it."""
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
    """Save a (compacted) model's tensors so the file grows with its number of nonzero entries.

    The file (``torch.save``, loadable with ``weights_only=True``) holds, per parameter and
    buffer, either the dense tensor or uint8 position deltas plus nonzero values, and the
    model's class name; not the module itself: :func:`load_sparse` loads it into a model of
    the same shapes. Masked models are refused: compact (or ``make_permanent``) them first.
    """
    _check_exportable(model)
    payload = {
        "format": SPARSE_FORMAT,
        "version": SPARSE_VERSION,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "tensors": {name: _encode(tensor) for name, tensor in _named_tensors(model).items()},
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return Path(path)


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return tensors


def _slot(model: nn.Module, name: str) -> Tensor:
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def read_sparse(path: PathLike, *, trust: bool = False) -> dict[str, Any]:
    """The content of a :func:`save_sparse` file, loaded with ``weights_only=True``; a
    format 1 file (a pickled module) only with ``trust=True``. Raises ``ValueError``
    naming the file for anything else."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust:
            raise ValueError(f"{path} holds pickled Python objects (a sparse file of format 1 pickles its module), "
                             f"and loading them can run code stored in the file: {_TRUST_HINT}") from None  # fmt: skip
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: named, whatever torch raised
        raise ValueError(f"{path} cannot be read ({type(error).__name__}): it is not a complete sparse file") from None
    check_sparse(payload, path)
    return payload


def check_sparse(payload: Any, path: PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` unless ``payload`` is a sparse file's content."""
    if not isinstance(payload, dict) or payload.get("format") != SPARSE_FORMAT:
        raise ValueError(f"{path} is not an nnrelief sparse model file")
    version = payload.get("version")
    if not isinstance(version, int) or version > SPARSE_VERSION:
        raise ValueError(f"{path}: sparse format version {version!r} is not one this nnrelief reads (1 to {SPARSE_VERSION})")
    tensors = payload.get("tensors")
    if not isinstance(tensors, dict) or (version == 1 and not isinstance(payload.get("module"), nn.Module)):
        raise ValueError(f"{path} is a damaged sparse file (its tensors or module are missing): write it again "
                         "(nnrelief compact --sparse)")  # fmt: skip


def sparse_tensors(payload: dict[str, Any], path: PathLike) -> dict[str, Tensor]:
    """The decoded tensors of a sparse file's ``payload`` by name."""
    decoded = {}
    for name, entry in payload["tensors"].items():
        try:
            decoded[name] = _decode(entry)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
            raise ValueError(f"{path} is a damaged sparse file: tensor {name!r} cannot be decoded "
                             f"({type(error).__name__}: {error}); write it again (nnrelief compact --sparse)") from None  # fmt: skip
    return decoded


def load_sparse(
    path: PathLike, model: nn.Module | None = None, map_location: str | torch.device | None = None, *, trust: bool = False
) -> nn.Module:
    """Load a file written by :func:`save_sparse` into ``model`` (a module of the compacted
    shapes, e.g. ``compact(pruned, example)``; its tensors are overwritten) and return it.

    Format 1 files hold their module (``model`` may be omitted) and load only with
    ``trust=True``: unpickling them can run code stored in the file.
    """
    loaded = sparse_model(read_sparse(path, trust=trust), path, model)
    return loaded.to(map_location) if map_location is not None else loaded


def sparse_model(payload: dict[str, Any], path: PathLike, model: nn.Module | None = None) -> nn.Module:
    """The model of a checked sparse ``payload`` (:func:`read_sparse`): ``model`` with the
    file's tensors, or for format 1 the file's own module."""
    tensors = sparse_tensors(payload, path)
    if model is None:
        if payload["version"] == 1:
            return _restored(payload["module"], tensors)
        raise ValueError(f"{path} holds the tensors of a {payload.get('class', 'model')} without its architecture: "
                         "give the model to load them into (load_sparse(path, compact(model, example)))")  # fmt: skip
    _copy_into(model, tensors, path)
    return model


def _copy_into(model: nn.Module, tensors: dict[str, Tensor], path: PathLike) -> None:
    expected = _named_tensors(model)
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{path} does not fit the model: missing {missing[:3]}, not in the model {extra[:3]}")
    for name, tensor in tensors.items():
        if expected[name].shape != tensor.shape:
            raise ValueError(f"{path} does not fit the model: {name} has shape {tuple(tensor.shape)} in the file, "
                             f"{tuple(expected[name].shape)} in the model")  # fmt: skip
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)


def _restored(model: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """A format 1 file's module, its empty placeholders replaced by the decoded tensors."""
    restored: dict[int, Tensor] = {}
    for name, tensor in tensors.items():
        placeholder = _slot(model, name)
        if isinstance(placeholder, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=placeholder.requires_grad)
        restored[id(placeholder)] = tensor
    for module in model.modules():  # every slot holding a placeholder (tied tensors included)
        for store in (module._parameters, module._buffers):
            for leaf, placeholder in store.items():
                if placeholder is not None and id(placeholder) in restored:
                    store[leaf] = restored[id(placeholder)]
    return model
