"""Reading a model file the user names, whatever wrote it, for ``nnrelief eval`` and ``report``.

A file is told apart by its content, not its extension (``.pt`` is used for all of them):

* a **TorchScript** archive (``torch.jit.save``, ``nnrelief compact -o x.pt``): a zip with
  ``<name>/code/`` entries;
* a **torch.export** program (``torch.export.save``, ``nnrelief compact -o x.pt2``): a zip with
  ``<name>/archive_format`` and ``<name>/models/`` entries;
* a **state dict** (the ``model-iter<k>.pt`` of a run folder): a ``torch.save`` zip whose
  ``data.pkl`` loads with ``weights_only=True`` to a mapping of tensors; it is loaded into a
  fresh model by :func:`~nnrelief.experiments.experiment.load_weights`;
* an **nnrelief.state_dict** (``nnrelief compact --state-dict``, :func:`nnrelief.state_dict`):
  tensors and the compacted shapes, loaded with ``weights_only=True`` into a fresh model of
  the run's (or ``--model``'s) class by :func:`nnrelief.load_state_dict`;
* a **whole module** (``torch.save(model)``) or an nnrelief sparse file of format 1: a
  ``torch.save`` zip that only loads with ``weights_only=False``;
* an nnrelief **sparse file** (``nnrelief compact --sparse``, format 2): tensors without the
  architecture, refused here with what to use instead;
* an **ONNX** file: refused (nnrelief does not run ONNX).

Every ``torch.save`` file is read with ``weights_only=True``. One that holds other pickled
objects (a whole module, a sparse file of format 1) is unpickled in full, which can run code
stored in the file, only when the user opts in (``trust=True``, ``--trust-file``); the
refusal says so. TorchScript and programs run the graph they hold, not Python code. Run
folders are read through :class:`~nnrelief.experiments.runfolder.RunFolder`, tensors only;
a file in a run folder is checked against the run's checksums when it is one of the run's
own files (what ``nnrelief compact`` writes there is not).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from . import data as nndata
from .compaction.export import SPARSE_FORMAT, check_sparse, sparse_model
from .compaction.opmetrics import op_summary
from .compaction.statedict import StateMismatchError, check_state, is_state, load_state_dict
from .experiments.config import ConfigError, ExperimentConfig
from .experiments.experiment import device_of, fresh_model, load_weights, run_data_dir, stored_config
from .experiments.runfolder import CONFIG, RunFolder, holds_run_file
from .metrics import ArchitectureSummary, summarize
from .pruning.masks import StateDictMismatchError
from .training import EvalResult, evaluate

logger = logging.getLogger(__name__)

STATE_DICT, TORCHSCRIPT, PROGRAM, MODULE, SPARSE = "state dict", "TorchScript", "ExportedProgram", "whole module", "sparse file"
ONNX, SHAPED = "ONNX", "nnrelief.state_dict"
_ACCEPTED = "a state dict, a TorchScript file, a torch.export .pt2 file or a torch.save'd module"
_COMPACTED = "the TorchScript (.pt) or .pt2 file of `nnrelief compact -o`, or its --state-dict file"


def file_format(path: Path) -> str:
    """:data:`TORCHSCRIPT`, :data:`PROGRAM`, :data:`ONNX` or ``"pickle"`` (any ``torch.save``
    file), from the file's content; a zip archive that is none of them, or a file that is no
    model at all (text, a few bytes) is refused naming the file and what to give."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {name.partition("/")[2] for name in archive.namelist()}
    except zipfile.BadZipFile:
        return _unzipped_format(path)
    if "archive_format" in entries or any(entry.startswith("models/") for entry in entries):
        return PROGRAM
    if "constants.pkl" in entries or any(entry.startswith("code/") for entry in entries):
        return TORCHSCRIPT
    if "data.pkl" in entries:
        return "pickle"
    raise ValueError(f"{path} is a zip archive without a model (no data.pkl, code/ or models/ entries): give {_ACCEPTED}")


def _unzipped_format(path: Path) -> str:
    """``"pickle"`` for torch.save's legacy format (a pickle: first byte 0x80), :data:`ONNX`;
    anything else refused."""
    with path.open("rb") as file:
        head = file.read(2)
    if head[:1] == b"\x80" and len(head) == 2:
        return "pickle"
    size = path.stat().st_size
    if head == b"PK":
        raise ValueError(f"{path} is damaged: a zip archive (torch.save, TorchScript or .pt2) that cannot be opened "
                         f"({size} bytes: cut short?); write it again or restore it from a copy")  # fmt: skip
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":  # protobuf field 1 (ir_version) of an ONNX model
        return ONNX
    raise ValueError(f"{path} is not a model file ({size} byte{'' if size == 1 else 's'}, neither a torch.save file, "
                     f"TorchScript nor a .pt2 program): give {_ACCEPTED}")  # fmt: skip


@dataclass
class ModelFile:
    """A model read from a file: the module (CPU, eval mode), what the file held, the
    architecture's name, and the dataset and run config known for it (``None`` if not)."""

    path: Path
    model: nn.Module
    kind: str
    architecture: str  # e.g. "LeNet300100 (lenet300_100)"
    dataset: str | None
    config: ExperimentConfig | None

    def summary(self, input_shape: tuple[int, ...]) -> ArchitectureSummary:
        """Parameters, MACs and alive channels per layer: from the ``nn.Linear``/``nn.Conv*``
        modules of a state dict or whole module, from the operations one forward pass runs
        for TorchScript and programs (which have no such modules); logged at INFO."""
        if self.kind in (TORCHSCRIPT, PROGRAM):
            logger.info("%s: %s file analysed from the operations of one forward pass", self.path, self.kind)
            return op_summary(self.model, input_shape)
        logger.info("%s: %s analysed from its Linear/conv modules", self.path, self.kind)
        return summarize(self.model, input_shape)


def load_model_file(
    path: str | os.PathLike[str], model: str | None = None, dataset: str | None = None, *, trust: bool = False
) -> ModelFile:
    """Read the model in ``path`` (see the module docstring for the formats).

    ``model`` and ``dataset`` default to the run's when the file lies in a run folder;
    ``model`` is needed for a state dict only (the other formats hold their architecture).
    ``trust``: unpickle a file that holds more than tensors (a whole module), which can run
    code stored in the file; without it such a file is refused. Nothing is written.
    """
    path = Path(path)
    if path.is_dir() or not path.is_file():
        return _state_dict_file(path, model, dataset)  # its errors name a folder's selected model
    folder = RunFolder(path.parent)
    if folder.exists(CONFIG) and holds_run_file(path):
        damage = folder.damaged(path.name)
        if damage is not None:
            raise damage  # a run's file that no longer matches its checksum: named, before its content is read
    kind = file_format(path)
    if kind == ONNX:
        raise ValueError(f"{path} is an ONNX model, which nnrelief does not run: evaluate {_COMPACTED}, "
                         "or run it with onnxruntime")  # fmt: skip
    loaded = _tensor_pickle(path, trust) if kind == "pickle" else None
    if is_state(loaded):
        return _shaped_file(path, loaded, model, dataset)
    if loaded is not None:
        return _state_dict_file(path, model, dataset)
    cfg = stored_config(folder) if folder.exists(CONFIG) else None
    if model is not None:
        logger.warning("%s holds its own architecture: --model %s is not used", path, model)
    net, kind = _load_module(path, kind)
    return ModelFile(path, net.eval(), kind, _architecture(net, kind), dataset or (cfg.dataset if cfg else None), cfg)


def _state_dict_file(path: Path, model: str | None, dataset: str | None) -> ModelFile:
    net, cfg = load_weights(path, model, dataset)
    return ModelFile(path, net, STATE_DICT, f"{type(net).__name__} ({model or cfg.model})", dataset or cfg.dataset, cfg)


def _shaped_file(path: Path, state: Mapping[str, Any], model: str | None, dataset: str | None) -> ModelFile:
    """An :func:`nnrelief.state_dict` file loaded into a fresh model of the run's (or the given) architecture."""
    check_state(state, str(path))
    folder = RunFolder(path.parent)
    cfg = stored_config(folder) if folder.exists(CONFIG) else None
    model_name, dataset_name = model or (cfg.model if cfg else None), dataset or (cfg.dataset if cfg else None)
    if model_name is None or dataset_name is None:
        raise ConfigError(f"{path} is an nnrelief.state_dict of a {state['class'].rpartition('.')[2]}, outside a run "
                          "folder: give its architecture and dataset (--model, --dataset)")  # fmt: skip
    net = fresh_model(model_name, dataset_name)
    remedy = "give --model/--dataset of the run it was compacted from"
    try:
        load_state_dict(net, state)
    except StateDictMismatchError as error:
        raise error.within(f"{path} does not fit model {model_name}", remedy) from None
    except StateMismatchError as error:
        raise ConfigError(f"{path} does not fit model {model_name}: {error.problem}; {remedy}") from None
    return ModelFile(path, net.eval(), SHAPED, f"{type(net).__name__} ({model_name})", dataset_name, cfg)


class _PickledObjects(ValueError):
    """A torch.save file that holds more than tensors (``weights_only=True`` refused it)."""


def _safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of ``path``; raises :class:`_PickledObjects` for a
    file of other pickled objects, ``ValueError`` naming the file for an unreadable one."""
    zipped = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))  # a class or function weights_only does not allow
        if found is None:
            raise ValueError(f"{path} cannot be read with weights_only=True: it is damaged or not a model file (a "
                             "file of Python objects loads only with --trust-file, for a file you trust)") from None  # fmt: skip
        raise _PickledObjects(f"{path} holds pickled Python objects, not only tensors (it names {found.group(1)})") from None
    except Exception as error:  # noqa: BLE001 - truncated or foreign: named, whatever torch raised
        raise ValueError(f"{path} cannot be read ({_first_line(error)}): it is truncated or damaged, or not "
                         f"a model; give {_ACCEPTED}") from None  # fmt: skip


def _tensor_pickle(path: Path, trust: bool) -> Mapping[str, Any] | None:
    """What ``torch.load(weights_only=True)`` reads from ``path``: a state dict or an
    :func:`nnrelief.state_dict`; ``None`` for a file of other pickled objects if ``trust``
    (else refused, naming ``--trust-file``)."""
    try:
        obj = _safe_load(path)
    except _PickledObjects as objects:
        if trust:
            return None
        raise ValueError(f"{objects}, and loading them can run code stored in the file: give --trust-file "
                         "(trust=True) only if you trust the file, or save the model as a state dict, TorchScript "
                         "or .pt2") from None  # fmt: skip
    if isinstance(obj, Mapping) and obj.get("format") == SPARSE_FORMAT:
        check_sparse(obj, path)
        raise ValueError(f"{path} is an nnrelief sparse file, which holds tensors without the architecture: evaluate "
                         f"{_COMPACTED}, or load it in Python with nnrelief.compaction.export.load_sparse(path, model)")  # fmt: skip
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a model: give {_ACCEPTED}")
    return obj


def require_state_dict(path: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` naming ``path`` and what to give unless it is a ``torch.save``
    file of tensors (what ``nnrelief compact`` takes); a missing file is left to the loader."""
    path = Path(path)
    if not path.is_file():
        return
    wanted = "compact takes a pruned state dict, e.g. RUN/model-iter<k>.pt"
    kind = file_format(path)
    if kind != "pickle":
        raise ValueError(f"{path} holds an exported model ({kind}): {wanted}")
    try:
        obj = _safe_load(path)
    except _PickledObjects as objects:
        raise ValueError(f"{objects} (a whole module?), not a state dict: {wanted}") from None
    if isinstance(obj, Mapping) and obj.get("format") == SPARSE_FORMAT:
        raise ValueError(f"{path} is an nnrelief sparse file, a model already compacted: {wanted}")
    if is_state(obj):
        raise ValueError(f"{path} is an nnrelief.state_dict, a model already compacted: {wanted}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _load_module(path: Path, kind: str) -> tuple[nn.Module, str]:
    if kind == TORCHSCRIPT:
        return torch.jit.load(str(path), map_location="cpu"), TORCHSCRIPT
    if kind == PROGRAM:
        return _fixed_mode(torch.export.load(str(path)).module()), PROGRAM
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user (trust=True)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{path} holds a module whose class cannot be imported here ({_first_line(error)}): "
                         "save it as TorchScript, .pt2 or a state dict, or make its class importable") from None  # fmt: skip
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path} cannot be read ({_first_line(error)}): give {_ACCEPTED}") from None
    if isinstance(obj, nn.Module):
        return obj, MODULE
    if isinstance(obj, Mapping) and obj.get("format") == SPARSE_FORMAT:
        check_sparse(obj, path)
        return sparse_model(obj, path), SPARSE
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a model: give {_ACCEPTED}")


def _fixed_mode(module: nn.Module) -> nn.Module:
    """An ExportedProgram's module, whose ``train()``/``eval()`` (which torch refuses: the
    program was traced in one mode) leave it as it is, so that it evaluates like a module."""
    module.train = types.MethodType(lambda self, mode=True: self, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(lambda self: self, module)  # type: ignore[method-assign]
    return module


def _architecture(net: nn.Module, kind: str) -> str:
    if kind == PROGRAM:
        return "torch.export graph"  # the program does not keep the class of the module it came from
    return getattr(net, "original_name", None) or type(net).__name__  # TorchScript keeps it as original_name


@dataclass
class ModelEvaluation:
    """Accuracy and counts of one model file on one split of a dataset."""

    file: ModelFile
    dataset: str
    split: str
    result: EvalResult
    summary: ArchitectureSummary


def _images(loaded: ModelFile, data_dir: str | None, split: str, download: bool) -> nndata.TensorDataset:
    """``split`` of the file's dataset, from ``data_dir`` or else the run's data folder
    (resolved against the run folder); a missing one names where it was looked for."""
    if data_dir is not None or loaded.config is None:
        if data_dir is None and not nndata.get_spec(loaded.dataset).packaged:
            raise ConfigError(f"dataset {loaded.dataset!r} of {loaded.path} needs its data folder: give --data-dir DIR")
        return nndata.load_dataset(loaded.dataset, data_dir, split, download=download)
    folder = run_data_dir(loaded.config.data_dir, loaded.path.parent)
    try:
        return nndata.load_dataset(loaded.dataset, folder, split, download=download)
    except FileNotFoundError as error:
        raise type(error)(f"the data folder of run {loaded.path.parent} ({folder}, from its {CONFIG}) does not hold "
                          f"{loaded.dataset}: give --data-dir DIR where it is (or --download); {error}") from None  # fmt: skip


def evaluate_model_file(
    path: str | os.PathLike[str], *, model: str | None = None, dataset: str | None = None, data_dir: str | None = None,
    split: str = "test", batch_size: int = 500, device: str = "auto", download: bool = False, trust: bool = False,
) -> ModelEvaluation:  # fmt: skip
    """Load ``path`` (:func:`load_model_file`), then its accuracy on ``split`` of ``dataset``
    (default: the run's; read from ``data_dir``, default the run's) and its summary."""
    loaded = load_model_file(path, model, dataset, trust=trust)
    if loaded.dataset is None:
        raise ConfigError(f"{loaded.path} is not in a run folder: give the dataset (--dataset)")
    images = _images(loaded, data_dir, split, download)
    target = device_of(device)
    loaded.model.to(target)
    batches = nndata.BatchLoader(images, batch_size, shuffle=False, seed=0, device=target)
    shape = tuple(images.image_shape)
    try:
        result = evaluate(loaded.model, batches, target)
    except RuntimeError as error:  # a TorchScript or program of other inputs fails inside its forward
        raise ValueError(f"{loaded.path} does not take {loaded.dataset} images {shape} ({_first_line(error)}); "
                         "give the dataset the model was trained on (--dataset)") from None  # fmt: skip
    return ModelEvaluation(loaded, loaded.dataset, split, result, loaded.summary(shape))
