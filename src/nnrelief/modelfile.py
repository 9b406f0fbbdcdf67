"""Reading a model file the user names, whatever wrote it, for ``nnrelief eval`` and ``report``.

A file is told apart by its content, not its extension (``.pt`` is used for all of them):

* a **TorchScript** archive (``torch.jit.save``, ``nnrelief compact -o x.pt``): a zip with
  ``<name>/code/`` entries;
* a **torch.export** program (``torch.export.save``, ``nnrelief compact -o x.pt2``): a zip with
  ``<name>/archive_format`` and ``<name>/models/`` entries;
* a **state dict** (the ``model-iter<k>.pt`` of a run folder): a ``torch.save`` zip whose
  ``data.pkl`` loads with ``weights_only=True`` to a mapping of tensors; it is loaded into a
  fresh model by :func:`~nnrelief.experiments.experiment.load_weights`;
* a **whole module** (``torch.save(model)``) or an nnrelief sparse file (``--sparse``): a
  ``torch.save`` zip that only loads with ``weights_only=False``.

A whole module or sparse file is unpickled in full (``weights_only=False``), which can run
code stored in the file, and TorchScript and programs run the graph they hold: this is done
only for a file the user named explicitly (the functions here); run folders are read through
:class:`~nnrelief.experiments.runfolder.RunFolder`, tensors only.
"""

from __future__ import annotations

import logging
import os
import pickle
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from . import data as nndata
from .compaction.export import SPARSE_FORMAT, load_sparse
from .compaction.opmetrics import op_summary
from .experiments.config import ConfigError, ExperimentConfig
from .experiments.experiment import device_of, load_weights, stored_config
from .experiments.runfolder import CONFIG, RunFolder
from .metrics import ArchitectureSummary, summarize
from .training import EvalResult, evaluate

logger = logging.getLogger(__name__)

STATE_DICT, TORCHSCRIPT, PROGRAM, MODULE, SPARSE = "state dict", "TorchScript", "ExportedProgram", "whole module", "sparse file"
_ACCEPTED = "a state dict, a TorchScript file, a torch.export .pt2 file or a torch.save'd module"


def file_format(path: Path) -> str:
    """:data:`TORCHSCRIPT`, :data:`PROGRAM` or ``"pickle"`` (any ``torch.save`` file), from the
    file's entries; a zip archive that is none of them is refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {name.partition("/")[2] for name in archive.namelist()}
    except zipfile.BadZipFile:
        return "pickle"  # torch.save's legacy format; torch.load tells
    if "archive_format" in entries or any(entry.startswith("models/") for entry in entries):
        return PROGRAM
    if "constants.pkl" in entries or any(entry.startswith("code/") for entry in entries):
        return TORCHSCRIPT
    if "data.pkl" in entries:
        return "pickle"
    raise ValueError(f"{path} is a zip archive without a model (no data.pkl, code/ or models/ entries): give {_ACCEPTED}")


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


def load_model_file(path: str | os.PathLike[str], model: str | None = None, dataset: str | None = None) -> ModelFile:
    """Read the model in ``path`` (see the module docstring for the formats).

    ``model`` and ``dataset`` default to the run's when the file lies in a run folder;
    ``model`` is needed for a state dict only (the other formats hold their architecture).
    Whole modules are loaded with ``torch.load(weights_only=False)``, which runs code of the
    file: only for a file named explicitly. Nothing is written.
    """
    path = Path(path)
    if path.is_dir() or not path.is_file():
        return _state_dict_file(path, model, dataset)  # its errors name a folder's selected model
    folder = RunFolder(path.parent)
    damage = folder.damaged(path.name) if folder.exists(CONFIG) else None
    if damage is not None:
        raise damage  # a run's file that no longer matches its checksum: named, before its content is read
    kind = file_format(path)
    if kind == "pickle" and _is_tensor_pickle(path):
        return _state_dict_file(path, model, dataset)
    cfg = stored_config(folder) if folder.exists(CONFIG) else None
    if model is not None:
        logger.warning("%s holds its own architecture: --model %s is not used", path, model)
    net, kind = _load_module(path, kind)
    return ModelFile(path, net.eval(), kind, _architecture(net, kind), dataset or (cfg.dataset if cfg else None), cfg)


def _state_dict_file(path: Path, model: str | None, dataset: str | None) -> ModelFile:
    net, cfg = load_weights(path, model, dataset)
    return ModelFile(path, net, STATE_DICT, f"{type(net).__name__} ({model or cfg.model})", dataset or cfg.dataset, cfg)


def _is_tensor_pickle(path: Path) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``path`` to a mapping (a state dict);
    ``False`` for a zip whose ``data.pkl`` holds other objects (a whole module)."""
    zipped = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        if zipped:
            return False
        raise ValueError(f"{path} cannot be read ({_first_line(error)}): give {_ACCEPTED}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} cannot be read ({_first_line(error)}): give {_ACCEPTED}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a model: give {_ACCEPTED}")
    return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _load_module(path: Path, kind: str) -> tuple[nn.Module, str]:
    if kind == TORCHSCRIPT:
        return torch.jit.load(str(path), map_location="cpu"), TORCHSCRIPT
    if kind == PROGRAM:
        return _fixed_mode(torch.export.load(str(path)).module()), PROGRAM
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{path} holds a module whose class cannot be imported here ({_first_line(error)}): "
                         "save it as TorchScript, .pt2 or a state dict, or make its class importable") from None  # fmt: skip
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path} cannot be read ({_first_line(error)}): give {_ACCEPTED}") from None
    if isinstance(obj, nn.Module):
        return obj, MODULE
    if isinstance(obj, Mapping) and obj.get("format") == SPARSE_FORMAT:
        return load_sparse(path), SPARSE
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


def evaluate_model_file(
    path: str | os.PathLike[str], *, model: str | None = None, dataset: str | None = None, data_dir: str | None = None,
    split: str = "test", batch_size: int = 500, device: str = "auto", download: bool = False,
) -> ModelEvaluation:  # fmt: skip
    """Load ``path`` (:func:`load_model_file`), then its accuracy on ``split`` of ``dataset``
    (default: the run's; read from ``data_dir``, default the run's) and its summary."""
    loaded = load_model_file(path, model, dataset)
    if loaded.dataset is None:
        raise ConfigError(f"{loaded.path} is not in a run folder: give the dataset (--dataset)")
    if data_dir is None and loaded.config is not None:
        data_dir = loaded.config.data_dir
    images = nndata.load_dataset(loaded.dataset, data_dir, split, download=download)
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
