"""The paper's experiments end to end: data, dense training and the iterative loop
(:func:`nnrelief.experiments.iterative.relieve`) in a run folder, as used by the ``nnrelief``
command.

An :class:`Experiment` runs an :class:`~nnrelief.experiments.config.ExperimentConfig` in a
:class:`~nnrelief.experiments.runfolder.RunFolder` named from its settings and resumes at
any point.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data as nndata
from ..distributed import from_main, init_from_env, is_main, rank, world_size
from ..fileio import cpu_state
from ..kinds import kind_of
from ..models import get_model, input_shape
from ..pruning.choices import parse_nm, spared_layers, unmatched_patterns
from ..pruning.masks import StateDictMismatchError, restore_masks
from ..pruning.nm import misfits_text, nm_misfits
from ..settings import flag_of
from ..training import EvalResult, evaluate, fit, resolve_device
from . import checksums
from . import runfolder as files
from .config import (
    FREE_FIELDS,
    LATER_FIELDS,
    RECORDED_FIELDS,
    ConfigError,
    ExperimentConfig,
    RunConflictError,
    derive_seed,
    input_mismatch,
    reproduce_command,
)
from .dense import dense_folder, shared_dense_state
from .history import History, IterationRecord
from .iterative import relieve
from .runfolder import DamagedFileError, RunFolder, RunFolderError

logger = logging.getLogger(__name__)

Data = nndata.TensorDataset | nndata.TokenStream
Loader = nndata.BatchLoader | nndata.SequenceLoader

_EVAL_BATCH = 500
_EVAL_SEQUENCES = 64  # token windows per evaluation batch of a language model


def claim_run_folder(cfg: ExperimentConfig, folder: RunFolder) -> None:
    """Make ``folder`` the run folder of ``cfg``: refuse one holding other settings or other
    files; write ``config.json`` only when it is missing (an existing run is never rewritten)
    or damaged and the run's records show it held these settings (:func:`_rebuild_config`).
    A ``config.json`` written before a setting of :data:`LATER_FIELDS` existed counts as
    having its default."""
    current = cfg.to_dict()
    if folder.exists(files.CONFIG):
        try:
            stored = read_config(folder).to_dict()
        except DamagedFileError as damage:
            _rebuild_config(cfg, folder, damage)
            return
        _refuse_other_settings(stored, current, f"run folder {folder.path} holds a run with other settings")
        return
    if not folder.is_unused():
        raise RunConflictError(f"{folder.path} is not empty and holds no {files.CONFIG}: not a run folder")
    folder.require_writable("the run has not started")
    folder.write_json(files.CONFIG, current)


def _refuse_other_settings(
    stored: Mapping[str, object], current: Mapping[str, object], what: str,
    remedy: str = "choose another --run-dir or delete it",
) -> None:  # fmt: skip
    diff = [k for k in current if k not in FREE_FIELDS and stored.get(k) != current[k]]
    if diff:
        details = ", ".join(f"{k}: stored={stored.get(k)!r} now={current[k]!r}" for k in diff)
        raise RunConflictError(f"{what} ({details}); {remedy}")


def read_config(folder: RunFolder) -> ExperimentConfig:
    """The settings in the run's ``config.json``; :class:`DamagedFileError` names the file
    when it is damaged or not a run's settings."""
    return config_from(folder.read_json(files.CONFIG), folder / files.CONFIG)


def config_from(data: object, path: Path) -> ExperimentConfig:
    """The :class:`ExperimentConfig` stored as ``data`` in ``path`` (settings added later,
    or recorded ones, may be missing); :class:`DamagedFileError` naming ``path`` otherwise."""
    optional = set(LATER_FIELDS) | RECORDED_FIELDS
    if not isinstance(data, Mapping):
        problem = f"a JSON {type(data).__name__}, not an object of settings"
    else:
        missing = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in data and f.name not in optional]
        problem = f"setting(s) {missing} missing" if missing else None
        if problem is None:
            try:
                return ExperimentConfig.from_dict({**LATER_FIELDS, **data})
            except ConfigError as error:
                problem = str(error)
    raise DamagedFileError(path, f"{path} does not hold a run's settings ({problem})", files.remedy(path.name))


def recorded_settings(folder: RunFolder) -> dict[str, object] | None:
    """The settings ``history.json`` records (the latest invocation's, with ``num_iters``
    the iterations the run holds when it asked for fewer), if it is intact."""
    try:
        data = folder.read_json(files.HISTORY_JSON) if folder.exists(files.HISTORY_JSON) else None
        return config_from(data.get("config"), folder / files.HISTORY_JSON).to_dict() if isinstance(data, dict) else None
    except DamagedFileError:
        return None


def _rebuild_config(cfg: ExperimentConfig, folder: RunFolder, damage: DamagedFileError) -> None:
    """Rewrite a damaged ``config.json`` when the run shows that it held ``cfg``'s
    settings: with those ``history.json`` records, or (before the first iteration) with
    ``cfg``'s if that reproduces its checksum."""
    current = cfg.to_dict()
    recorded = recorded_settings(folder)
    text = json.dumps(recorded or current, indent=2, allow_nan=False) + "\n"
    entry = checksums.of(folder.path).entry(files.CONFIG)
    if recorded is not None:
        what = f"{damage.problem}, and the settings {folder / files.HISTORY_JSON} records are not this command's"
        _refuse_other_settings(recorded, current, what, f"`{run_command(folder)}` rewrites it")
    elif entry is None or entry["sha256"] != checksums.sha256_of(text.encode()):
        raise RunConflictError(f"{damage.problem}, and the run holds no other record of its settings yet; run "
                               "exactly the command that made it, or delete the folder to start over")  # fmt: skip
    folder.require_writable(f"{folder / files.CONFIG} is damaged")
    logger.warning("%s; rewritten with the settings the run records", damage.problem)
    folder.write_text(files.CONFIG, text)


def run_command(folder: RunFolder) -> str | None:
    """The ``nnrelief prune`` command that rewrites the damaged ``config.json`` of
    ``folder`` from the settings ``history.json`` records (``None`` without them)."""

    recorded = recorded_settings(folder)
    if recorded is None:
        return None
    cfg = ExperimentConfig.from_dict(recorded)
    command = reproduce_command(cfg, run_data_dir(cfg.data_dir, folder.path) or "DATA")
    if cfg.data_dir is None and nndata.get_spec(cfg.dataset).packaged:
        command = command.rpartition(" --data-dir ")[0]
    return command + f" --run-dir {shlex.quote(str(folder.path))}"


def stored_config(folder: RunFolder) -> ExperimentConfig:
    """:func:`read_config` for commands that read a run: a damaged ``config.json`` is
    named with the command that rewrites it."""
    try:
        return read_config(folder)
    except DamagedFileError as damage:
        command = run_command(folder)
        if command is None:
            raise
        raise DamagedFileError(damage.path, damage.problem, f"`{command}` (the settings the run recorded) rewrites it") from None


def stored_data_dir(data_dir: str | None, run_dir: str | os.PathLike[str]) -> str | None:
    """``data_dir`` (as given: relative to the working folder) as a run stores it: relative
    to the run folder, so that the run read from anywhere, or moved with its data, finds it."""
    if data_dir is None:
        return None
    return os.path.relpath(os.path.abspath(os.path.expanduser(data_dir)), os.path.abspath(run_dir))


def run_data_dir(stored: str | None, run_dir: str | os.PathLike[str]) -> str | None:
    """The data folder a run's stored ``data_dir`` names: relative to the run folder (as
    runs store it, :func:`stored_data_dir`), else, for runs written before, relative to the
    working folder if that is where it is."""
    if stored is None:
        return None
    given = Path(stored).expanduser()
    if given.is_absolute():
        return str(given)
    beside = Path(os.path.normpath(Path(run_dir).absolute() / given))
    return str(given) if given.is_dir() and not beside.is_dir() else str(beside)


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
    the number of classes comes from ``dataset`` (default: that config's). The file is
    checked against the run's checksums and for finite values. Returns the model (on CPU,
    eval mode) and the run's config if there is one. A state dict of another model raises
    :class:`~nnrelief.pruning.masks.StateDictMismatchError` naming the file and the first differences.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a weights file, e.g. {path / _selected_model(path)}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    run = RunFolder(path.parent)
    cfg = stored_config(run) if run.exists(files.CONFIG) else None
    model_name = model or (cfg.model if cfg else None)
    dataset_name = dataset or (cfg.dataset if cfg else None)
    if model_name is None or dataset_name is None:
        raise ConfigError(f"{path} is not in a run folder: give the model and the dataset")
    net = fresh_model(model_name, dataset_name)
    state = run.load(path.name)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # a training checkpoint (*.ckpt) or a loop state
    _check_tensors(state, path)
    try:
        restore_masks(net, state)
    except StateDictMismatchError as error:
        raise error.within(f"{path} does not fit model {model_name}", "give --model/--dataset of the run") from None
    except ValueError as error:
        raise ConfigError(f"{path} does not fit model {model_name}: {error}; give --model/--dataset of the run") from None
    return net.eval(), cfg


def _check_tensors(state: Any, path: Path) -> None:
    """Raise :class:`ConfigError` naming ``path`` unless ``state`` maps names to tensors."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict: give a model file such as "
                          "RUN/model-iter<k>.pt")  # fmt: skip
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{path} is not a state dict: entry {key!r} is a {type(value).__name__}, not a tensor; "
                              "give a model file such as RUN/model-iter<k>.pt")  # fmt: skip


def _selected_model(run_dir: Path) -> str:
    try:
        return files.model_file(RunFolder(run_dir).read_history().selected_iteration)
    except (OSError, DamagedFileError):
        return "model-iter<k>.pt"


def fresh_model(model_name: str, dataset_name: str) -> nn.Module:
    """An untrained ``model_name`` for ``dataset_name``'s classes; refused if the dataset's
    images do not fit the model."""
    if dataset_name not in nndata.DATASETS:
        raise ConfigError(f"unknown dataset {dataset_name!r}; known: {', '.join(sorted(nndata.DATASETS))}")
    spec = nndata.get_spec(dataset_name)
    try:
        net = get_model(model_name, spec.num_classes)
        problem = input_mismatch(model_name, dataset_name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if problem is not None:
        raise ConfigError(f"{problem}: give the dataset the model was trained on (--dataset)")
    return net


def check_layer_patterns(cfg: ExperimentConfig) -> None:
    """Refuse layer name patterns of ``cfg`` that match no layer of its model the pass prunes (:mod:`nnrelief.kinds`),
    ``ignore``/``only`` that leave nothing to prune, and under ``nm`` pruned layers whose inputs do not
    split into its groups (the model is built on the meta device)."""
    if not (cfg.ignore or cfg.only or cfg.alphas or cfg.nm):
        return
    with torch.device("meta"):
        model = fresh_model(cfg.model, cfg.dataset)
    layers = {name: m for name, m in model.named_modules() if kind_of(m) is not None}
    shown = ", ".join(list(layers)[:12]) + (", ..." if len(layers) > 12 else "")
    for name, patterns in (("ignore", cfg.ignore), ("only", cfg.only), ("alphas", list(cfg.alpha_map))):
        for pattern in unmatched_patterns(patterns, layers):
            raise ConfigError(f"setting {name}: pattern {pattern!r} matches no layer of {cfg.model} ({shown}) (flag {flag_of(name)})")
    spared = spared_layers(layers, list(cfg.ignore), list(cfg.only))
    if not set(layers) - spared:
        raise ConfigError(f"settings ignore/only spare every layer of {cfg.model}: nothing to prune (flags --ignore, --only)")
    if cfg.nm:
        _check_nm_widths(cfg, {name: module for name, module in layers.items() if name not in spared})


def _check_nm_widths(cfg: ExperimentConfig, pruned: Mapping[str, nn.Module]) -> None:
    """Refuse pruned layers whose inputs do not split into the groups of ``cfg.nm``."""
    m = parse_nm(cfg.nm)[1]
    misfits = nm_misfits(pruned, m)
    if misfits:
        raise ConfigError(f"setting nm {cfg.nm}: {misfits_text(misfits)} of {cfg.model} do not split into groups of {m} "
                          f"inputs: spare them with --ignore {' '.join([*cfg.ignore, *misfits])} (flag --nm)")  # fmt: skip


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
        check_layer_patterns(cfg)
        self.device = device_of(cfg.device)
        init_from_env(cfg.device)  # torchrun: join the other processes
        self.data_dir = None if cfg.data_dir is None else os.path.abspath(os.path.expanduser(cfg.data_dir))
        self.cfg = cfg = dataclasses.replace(cfg, world_size=world_size(), data_dir=stored_data_dir(cfg.data_dir, run_dir))
        self.folder = RunFolder(run_dir)
        self.download = download
        self.progress = progress and is_main()
        spec = nndata.get_spec(cfg.dataset)
        if cfg.data_dir is None and not spec.packaged:
            raise ConfigError(f"dataset {cfg.dataset!r} needs a data directory: give --data-dir DIR (data_dir in a config file; "
                              "with --download the files are fetched into it)")
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

    def _load_data(self) -> tuple[Data, Data, Data]:
        cfg = self.cfg
        if cfg.is_language_model:  # the corpus holds out whole works for validation and test
            train, val, test = (nndata.load_dataset(cfg.dataset, self.data_dir, split, download=self.download)
                                for split in ("train", "val", "test"))  # fmt: skip
            logger.info("data: %d train, %d validation, %d test tokens", len(train), len(val), len(test))
            return train, val, test
        full = nndata.load_dataset(cfg.dataset, self.data_dir, "train", download=self.download)
        test = nndata.load_dataset(cfg.dataset, self.data_dir, "test", download=self.download)
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

    def _eval_loader(self, dataset: Data) -> Loader:
        if isinstance(dataset, nndata.TokenStream):
            return nndata.SequenceLoader(dataset, _EVAL_SEQUENCES, self.context, shuffle=False, seed=0, device=self.device,
                                         rank=rank(), world_size=world_size())  # fmt: skip
        return nndata.BatchLoader(dataset, _EVAL_BATCH, shuffle=False, seed=0, device=self.device,
                                  rank=rank(), world_size=world_size())  # fmt: skip

    @property
    def context(self) -> int:
        """Tokens per window of a language model: its context (:func:`~nnrelief.models.input_shape`)."""
        return input_shape(self.cfg.model)[0]

    def train_loader(self, *phase: object) -> Loader:
        """Shuffled training batches of a phase (e.g. ("retrain", k)): the same for every
        method and every resumed run, as they depend only on the seed and the phase."""
        if isinstance(self.train_set, nndata.TokenStream):
            return nndata.SequenceLoader(
                self.train_set, self.cfg.batch_size, self.context, shuffle=True, seed=derive_seed(self.cfg.seed, "batches", *phase),
                device=self.device, steps=self.cfg.steps_per_epoch, rank=rank(), world_size=world_size(), even_shards=True,
            )  # fmt: skip
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

    def evaluations(self, model: nn.Module) -> dict[str, EvalResult]:
        """Validation and test loss and accuracy of ``model`` (of a language model: per
        token, with its bits per token and perplexity)."""
        return {"val": evaluate(model, self.val_batches, self.device), "test": evaluate(model, self.test_batches, self.device)}

    def require_classifier(self, what: str) -> None:
        """Refuse ``what`` for a language model: so far only its dense training is wired
        (pruning it one shot is issue 29's later part)."""
        if self.cfg.is_language_model:
            raise ConfigError(f"{what} of the language model {self.cfg.model} on {self.cfg.dataset} is not supported yet; "
                              "`nnrelief train` trains it")  # fmt: skip

    def initial_model(self) -> nn.Module:
        """The untrained model, built from the seed (stored as ``init.pt``; rebuilt from the
        seed if damaged, when that reproduces its checksum) on the device."""
        torch.manual_seed(derive_seed(self.cfg.seed, "init"))
        model = get_model(self.cfg.model, self.cfg.num_classes)
        if not self.folder.exists(files.INIT):
            self.folder.save(files.INIT, cpu_state(model))
            return model.to(self.device)
        try:
            model.load_state_dict(self.folder.load(files.INIT))
        except DamagedFileError as damage:
            self.folder.rebuild(files.INIT, cpu_state(model), damage, source="the seed")
        return model.to(self.device)

    @property
    def dense_dir(self) -> Path:
        """The folder of the dense model shared by the runs that train it the same way
        (:mod:`nnrelief.experiments.dense`)."""
        return dense_folder(self.run_dir, self.cfg)

    def train_dense(self) -> nn.Module:
        """The dense trained model: loaded from the run's ``trained.pt`` (rebuilt from
        ``model-iter0.pt`` if damaged); else copied from the shared dense folder, trained
        there first (resumably) if no run has yet. A run whose dense training started in its
        own folder (before dense models were shared) finishes it there."""
        trained = self.folder.exists(files.TRAINED)
        if not trained:
            self.folder.require_writable("the dense model is not trained yet")
        model = self.initial_model()
        if trained:
            fix = "delete it to train the dense model again, or restore it from a copy"
            model.load_state_dict(self.folder.load_or_rebuild(files.TRAINED, files.model_file(0), fix))
            logger.info("dense model loaded from %s", self.folder / files.TRAINED)
        elif self.folder.exists(files.DENSE_CHECKPOINT):
            self._fit_dense(model, self.folder)
            self.folder.save(files.TRAINED, cpu_state(model))
        else:
            model.load_state_dict(shared_dense_state(self.cfg, self.run_dir, model, self._fit_dense))
            self.folder.save(files.TRAINED, cpu_state(model))
        self.folder.remove(files.DENSE_CHECKPOINT)
        return model

    def _fit_dense(self, model: nn.Module, folder: RunFolder) -> None:
        logger.info("training the dense %s on %s in %s", self.cfg.model, self.cfg.dataset, folder.path)
        folder.drop_if_damaged(files.DENSE_CHECKPOINT)
        fit(model, self.train_loader("dense"), self.val_batches, self.cfg.train_config(),
            checkpoint_path=folder / files.DENSE_CHECKPOINT, progress=self.progress, desc="dense training")  # fmt: skip

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
        folder.drop_if_damaged(files.retrain_checkpoint(iteration))
        fit(model, self.train_loader("retrain", iteration), self.val_batches,
            self.cfg.train_config(retrain_iteration=iteration),
            checkpoint_path=folder / files.retrain_checkpoint(iteration), progress=self.progress, desc=phase)  # fmt: skip

    def _history_extra(self, done: int) -> dict[str, object]:
        """What ``history.json`` records beside the iterations: these settings, with the
        iterations the run holds where it asked for fewer."""
        return {"config": {**self.cfg.to_dict(), "num_iters": max(self.cfg.num_iters, done)}}

    def record_finished(self, history: History) -> None:
        """Record in ``history.json`` that the run is finished as asked now (a run shortened
        by ``num_iters`` then reads "finished" in reports); nothing is written when that is
        what it records already, or when the folder is read-only."""
        try:
            self.folder.require_writable("the settings it records changed")
        except RunFolderError:
            return
        self.folder.write_history(history, self._history_extra(history.records[-1].iteration))

    def finished(self) -> History | None:
        """The run's history if it is already finished (``num_iters`` iterations retrained, or
        stopped early), without changing anything; else None."""
        return self.folder.finished_history(self.cfg.num_iters)

    def run(self) -> History:
        """Dense training (if not done yet) and the iterative procedure; the history."""
        self.require_classifier("iterative pruning")
        model = self.train_dense()
        damage = self.folder.damaged(files.model_file(0))  # the loop's copy of the dense model
        if damage is not None:
            self.folder.rebuild(files.model_file(0), cpu_state(model), damage, source=files.TRAINED)

        def finished(record: IterationRecord) -> None:
            self.folder.remove(files.retrain_checkpoint(record.iteration))

        history = relieve(
            model,
            prune_batches=self.pruning_batches,
            train_fn=self.retrain,
            eval_fns=self.eval_fns(),
            num_iters=self.cfg.num_iters,
            settings=self.cfg.pass_settings(),
            rewind_state=self.initial_state(),
            run_dir=self.run_dir,
            early_stop_margin=self.cfg.early_stop_margin,
            progress=self.progress,
            on_iteration_end=finished,
            history_extra=self._history_extra(self.folder.iterations_done()),
        )
        self.folder.remove(files.RETRAIN_CHECKPOINTS)
        return history
