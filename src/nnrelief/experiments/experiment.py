"""The paper's experiments end to end: data, dense training and the iterative loop
(:func:`nnrelief.experiments.iterative.relieve`) in a run folder, as used by the ``nnrelief``
command.

An :class:`Experiment` runs an :class:`~nnrelief.experiments.config.ExperimentConfig` in a
:class:`~nnrelief.experiments.runfolder.RunFolder` named from its settings and resumes at
any point.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .. import data as nndata
from ..distributed import from_main, init_from_env, is_main, rank, world_size
from ..fileio import cpu_state
from ..masks import restore_masks
from ..models import get_model
from ..training import evaluate, fit, resolve_device
from . import runfolder as files
from .config import FREE_FIELDS, LATER_FIELDS, ConfigError, ExperimentConfig, RunConflictError, derive_seed
from .history import History, IterationRecord
from .iterative import relieve
from .runfolder import RunFolder

logger = logging.getLogger(__name__)

_EVAL_BATCH = 500


def claim_run_folder(cfg: ExperimentConfig, folder: RunFolder) -> None:
    """Make ``folder`` the run folder of ``cfg``: refuse one holding other settings or other
    files; write ``config.json`` only when it is missing (an existing run is never rewritten).
    A ``config.json`` written before a setting of :data:`LATER_FIELDS` existed counts as
    having its default."""
    current = cfg.to_dict()
    if folder.exists(files.CONFIG):
        stored = {**LATER_FIELDS, **folder.read_json(files.CONFIG)}
        diff = [k for k in current if k not in FREE_FIELDS and stored.get(k) != current[k]]
        if diff:
            details = ", ".join(f"{k}: stored={stored.get(k)!r} now={current[k]!r}" for k in diff)
            raise RunConflictError(
                f"run folder {folder.path} holds a run with other settings ({details}); "
                "choose another --run-dir or delete it"
            )
        return
    if not folder.is_unused():
        raise RunConflictError(f"{folder.path} is not empty and holds no {files.CONFIG}: not a run folder")
    folder.write_json(files.CONFIG, current)


def device_of(name: str) -> torch.device:
    """:func:`resolve_device`, with a missing CUDA reported as a setting error."""
    try:
        return resolve_device(name)
    except RuntimeError as error:
        raise ConfigError(f"setting device: {error}") from None


def load_weights(
    path: str | os.PathLike[str], model: str | None = None, dataset: str | None = None
) -> tuple[nn.Module, ExperimentConfig | None]:
    """Load a saved ``state_dict`` (with or without masks) into a fresh model.

    ``model`` defaults to the one in the ``config.json`` next to the file (a run folder);
    the number of classes comes from ``dataset`` (default: that config's). Returns the
    model (on CPU, eval mode) and the run's config if there is one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    run = RunFolder(path.parent)
    cfg = ExperimentConfig.from_dict(run.read_json(files.CONFIG)) if run.exists(files.CONFIG) else None
    model_name = model or (cfg.model if cfg else None)
    dataset_name = dataset or (cfg.dataset if cfg else None)
    if model_name is None or dataset_name is None:
        raise ConfigError(f"{path} is not in a run folder: give the model and the dataset")
    if dataset_name not in nndata.DATASETS:
        raise ConfigError(f"unknown dataset {dataset_name!r}; known: {', '.join(sorted(nndata.DATASETS))}")
    try:
        net = get_model(model_name, nndata.get_spec(dataset_name).num_classes)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user error here
        raise ConfigError(
            f"{path} is not a readable state_dict file ({type(error).__name__}); give a model-iter<k>.pt, "
            "trained.pt or init.pt written by nnrelief"
        ) from None
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # a training checkpoint (*.ckpt) or a loop state
    try:
        restore_masks(net, state)
    except ValueError as error:
        raise ConfigError(f"{path} does not fit model {model_name}: {error}; give --model/--dataset of the run") from None
    return net.eval(), cfg


class Experiment:
    """One run of an :class:`ExperimentConfig` in a run folder (resumable at any point).

    ``Experiment(cfg, "runs/x").run()`` trains the dense model (or loads it from the
    folder), then runs :func:`relieve` with :func:`nnrelief.training.fit` as the training
    function, each phase with its own per-epoch checkpoint. Killing the process at any
    moment and running again continues after the last finished epoch and yields the same
    history as an uninterrupted run (on CPU). Under ``torchrun`` the processes join one
    group here (:func:`nnrelief.distributed.init_from_env`) and share every batch (the
    training batch ``cfg.batch_size`` is the global one); rank 0 alone reads and writes
    the run folder, and ``cfg.world_size`` becomes the number of processes.

    Args:
        cfg: the settings.
        run_dir: the run folder; refused if it holds a run with other settings.
        download: download missing datasets.
        progress: tqdm progress bars.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | os.PathLike[str],
        *,
        download: bool = False,
        progress: bool = True,
    ) -> None:
        self.device = device_of(cfg.device)
        init_from_env(cfg.device)  # torchrun: join the other processes
        self.cfg = cfg = dataclasses.replace(cfg, world_size=world_size())
        self.folder = RunFolder(run_dir)
        self.download = download
        self.progress = progress and is_main()
        spec = nndata.get_spec(cfg.dataset)
        if cfg.data_dir is None and not spec.packaged:
            raise ConfigError(f"dataset {cfg.dataset!r} needs a data directory (data_dir)")
        self.augment = spec.augment if cfg.augment is None else cfg.augment
        self.train_set, self.val_set, self.test_set = self._load_data()
        self.folder.open_for_writing()
        try:
            from_main(claim_run_folder, cfg, self.folder)  # torchrun: rank 0 checks, every rank learns
        except BaseException:
            self.folder.close()
            raise
        self.val_batches = self._eval_loader(self.val_set)
        self.test_batches = self._eval_loader(self.test_set)

    @property
    def run_dir(self) -> Path:
        """The run folder's path."""
        return self.folder.path

    def close(self) -> None:
        """Release the run folder's lock (also released when the process ends)."""
        self.folder.close()

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _load_data(self) -> tuple[nndata.TensorDataset, nndata.TensorDataset, nndata.TensorDataset]:
        cfg = self.cfg
        full = nndata.load_dataset(cfg.dataset, cfg.data_dir, "train", download=self.download)
        test = nndata.load_dataset(cfg.dataset, cfg.data_dir, "test", download=self.download)
        train, val = nndata.train_val_split(full, cfg.val_size, seed=cfg.seed)
        if cfg.train_subset is not None:
            if cfg.train_subset >= len(train):
                raise ConfigError(f"train_subset must be < {len(train)} (training samples), got {cfg.train_subset}")
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "subset"))
            order = torch.randperm(len(train), generator=generator)
            train = nndata.subset(train, order[: cfg.train_subset].sort().values)
        if cfg.prune_samples > len(train):
            raise ConfigError(f"prune_samples must be <= {len(train)} (training samples), got {cfg.prune_samples}")
        logger.info("data: %d train, %d validation, %d test samples", len(train), len(val), len(test))
        return train, val, test

    def _eval_loader(self, dataset: nndata.TensorDataset) -> nndata.BatchLoader:
        return nndata.BatchLoader(dataset, _EVAL_BATCH, shuffle=False, seed=0, device=self.device,
                                  rank=rank(), world_size=world_size())  # fmt: skip

    def train_loader(self, *phase: object) -> nndata.BatchLoader:
        """Shuffled training batches of a phase (e.g. ("retrain", k)): the same for every
        method and every resumed run, as they depend only on the seed and the phase."""
        return nndata.BatchLoader(
            self.train_set, self.cfg.batch_size, shuffle=True,
            seed=derive_seed(self.cfg.seed, "batches", *phase), device=self.device,
            augment=self.augment, rank=rank(), world_size=world_size(), even_shards=True,
        )  # fmt: skip

    def pruning_batches(self, iteration: int) -> nndata.BatchLoader:
        """The pruning set of ``iteration`` (depends only on the seed and the iteration)."""
        pruning_set = nndata.sample_pruning_set(
            self.train_set, self.cfg.prune_samples, seed=derive_seed(self.cfg.seed, "prune", iteration)
        )
        return self._eval_loader(pruning_set)

    def eval_fns(self) -> dict[str, Callable[[nn.Module], float]]:
        """Validation and test accuracy functions (the history's ``val`` and ``test``)."""
        return {
            "val": lambda model: evaluate(model, self.val_batches, self.device).accuracy,
            "test": lambda model: evaluate(model, self.test_batches, self.device).accuracy,
        }

    def accuracies(self, model: nn.Module) -> dict[str, float]:
        """Validation and test accuracy of ``model``."""
        return {name: fn(model) for name, fn in self.eval_fns().items()}

    def initial_model(self) -> nn.Module:
        """The untrained model, built from the seed (stored as ``init.pt``) on the device."""
        torch.manual_seed(derive_seed(self.cfg.seed, "init"))
        model = get_model(self.cfg.model, self.cfg.num_classes)
        if self.folder.exists(files.INIT):
            model.load_state_dict(self.folder.load(files.INIT))
        else:
            self.folder.save(files.INIT, cpu_state(model))
        return model.to(self.device)

    def train_dense(self) -> nn.Module:
        """The dense trained model: loaded from ``trained.pt``, or trained (resumably)."""
        model = self.initial_model()
        if self.folder.exists(files.TRAINED):
            model.load_state_dict(self.folder.load(files.TRAINED))
            logger.info("dense model loaded from %s", self.folder / files.TRAINED)
        else:
            logger.info("training the dense %s on %s", self.cfg.model, self.cfg.dataset)
            self.folder.check_readable(files.DENSE_CHECKPOINT)
            fit(model, self.train_loader("dense"), self.val_batches, self.cfg.train_config(),
                checkpoint_path=self.folder / files.DENSE_CHECKPOINT, progress=self.progress, desc="dense training")  # fmt: skip
            self.folder.save(files.TRAINED, cpu_state(model))
        self.folder.remove(files.DENSE_CHECKPOINT)
        return model

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """The initial weights the surviving weights are rewound to (``None`` without rewinding)."""
        return self.folder.load(files.INIT) if self.cfg.rewind else None

    def retrain(self, model: nn.Module, iteration: int, folder: RunFolder | None = None, method: str | None = None) -> None:
        """Retrain ``model`` as iteration ``iteration`` does (its batches, seed and settings),
        resumably through a per-epoch checkpoint in ``folder`` (default: the run folder).
        ``method`` (a baseline's name) prefixes the phase name in progress bars, logs and errors."""
        folder = folder if folder is not None else self.folder
        phase = f"retraining, iteration {iteration}" if method is None else f"{method} retraining, iteration {iteration}"
        folder.remove(files.RETRAIN_CHECKPOINTS, keep=files.retrain_checkpoint(iteration))
        folder.check_readable(files.retrain_checkpoint(iteration))
        fit(model, self.train_loader("retrain", iteration), self.val_batches,
            self.cfg.train_config(retrain_iteration=iteration),
            checkpoint_path=folder / files.retrain_checkpoint(iteration), progress=self.progress, desc=phase)  # fmt: skip

    def run(self) -> History:
        """Dense training (if not done yet) and the iterative procedure; the history."""
        model = self.train_dense()

        def finished(record: IterationRecord) -> None:
            self.folder.remove(files.retrain_checkpoint(record.iteration))

        history = relieve(
            model,
            prune_batches=self.pruning_batches,
            train_fn=self.retrain,
            eval_fns=self.eval_fns(),
            num_iters=self.cfg.num_iters,
            alpha_fc=self.cfg.alpha_fc,
            alpha_conv=self.cfg.alpha_conv,
            score=self.cfg.score,
            rewind_state=self.initial_state(),
            run_dir=self.run_dir,
            early_stop_margin=self.cfg.early_stop_margin,
            progress=self.progress,
            on_iteration_end=finished,
            history_extra={"config": self.cfg.to_dict()},
        )
        self.folder.remove(files.RETRAIN_CHECKPOINTS)
        return history
