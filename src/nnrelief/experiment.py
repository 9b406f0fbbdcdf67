"""The paper's experiments end to end: settings, presets, run folders, data, training and
the iterative loop (:func:`nnrelief.iterative.relieve`), as used by the ``nnrelief`` command.

:class:`ExperimentConfig` holds every setting; :data:`PRESETS` the paper's (ALGORITHM.md);
:func:`resolve_config` merges defaults < preset < TOML file < flags. An
:class:`Experiment` runs in a folder named from its settings and resumes at any point.

Files of a run folder (all written atomically: temporary file + ``os.replace``):

==========================  ==============================================================
``config.json``             the :class:`ExperimentConfig` (runs never mix configs)
``init.pt``                 initial weights (plain ``state_dict``)
``dense.ckpt``              per-epoch checkpoint of the dense training (removed when done)
``trained.pt``              the dense trained weights
``retrain-<k>.ckpt``        per-epoch checkpoint of retraining in iteration k (removed)
``relief_state.pt``         the loop's state: model with masks, history, pending record
``model-iter<k>.pt``        weights and masks after iteration k (load with ``restore_masks``)
``history.csv/.json``       one row per iteration (iteration 0 = the dense model)
==========================  ==============================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as nndata
from .fileio import cpu_state, save_text, save_torch
from .history import History, IterationRecord
from .iterative import relieve
from .masks import restore_masks
from .models import MODELS, get_model
from .models import input_shape as model_input_shape
from .pruning import SCORE_MODES
from .training import TrainConfig, evaluate, fit, resolve_device

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


class ConfigError(ValueError):
    """An invalid experiment setting, preset, config file or run folder."""


class RunConflictError(ConfigError):
    """A run folder already holds a run with different settings."""


# ----------------------------------------------------------------------------- helpers


def derive_seed(*parts: object) -> int:
    """A 63-bit seed depending only on ``parts`` (e.g. the run seed, a purpose, an iteration)."""
    digest = hashlib.blake2b(repr(("nnrelief.iterative",) + parts).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


FREE_FIELDS = frozenset({"data_dir", "device", "num_iters"})
# Settings added after the first release: left out of the folder hash while at these
# defaults, and assumed to have them in run folders written before they existed.
LATER_FIELDS: dict[str, Any] = {"lr_schedule": "step"}
_EVAL_BATCH = 500


@dataclass
class ExperimentConfig:
    """All settings of one paper-style experiment (dense training + iterative pruning).

    Attributes:
        model: a name of :data:`nnrelief.models.MODELS`.
        dataset: a name of :data:`nnrelief.data.DATASETS` (it fixes the number of classes).
        data_dir: folder of the dataset files (not needed for ``mnist-sample``).
        epochs: dense training epochs.
        retrain_epochs: training epochs after each pruning pass.
        optimizer: ``adam``, ``sgd`` or ``adamw``.
        lr: learning rate of the dense training.
        retrain_lr: learning rate of retraining (``None``: ``lr``).
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        batch_size: training batch size.
        milestones: dense-training epochs after which the learning rate decays.
        retrain_milestones: the same for retraining.
        gamma: learning-rate decay factor.
        lr_schedule: ``step`` (milestones) or ``cosine`` (annealing to 0 over each phase).
        alpha_fc: kept signal fraction of Linear layers.
        alpha_conv: kept signal fraction of Conv2d layers.
        score: ``paper`` or ``authors`` conv score.
        num_iters: pruning iterations.
        prune_samples: size of the pruning set, drawn from the training data anew each
            iteration (seeded by ``seed`` and the iteration).
        val_size: validation samples held out of the training data (``None``: the
            dataset's default); the best epoch is chosen on them, never on the test set.
        augment: crop + flip augmentation of training batches (``None``: dataset default).
        rewind: reset surviving weights to their initial values before retraining
            (the paper's procedure for LeNets) instead of fine-tuning.
        seed: seed of everything (model init, splits, batches, pruning sets).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        early_stop_margin: stop when validation accuracy falls more than this fraction
            below the dense model's (``None``: run all iterations).
        train_subset: train on this many samples of the training split only (quick runs).
    """

    model: str = "lenet300_100"
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 60
    retrain_epochs: int = 60
    optimizer: str = "adam"
    lr: float = 1e-3
    retrain_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 120
    milestones: list[int] = field(default_factory=lambda: [30])
    retrain_milestones: list[int] = field(default_factory=lambda: [30])
    gamma: float = 0.1
    lr_schedule: str = "step"
    alpha_fc: float = 0.95
    alpha_conv: float = 0.9
    score: str = "paper"
    num_iters: int = 10
    prune_samples: int = 1000
    val_size: int | None = None
    augment: bool | None = None
    rewind: bool = False
    seed: int = 0
    device: str = "auto"
    early_stop_margin: float | None = None
    train_subset: int | None = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(getattr(self, f.name), hints[f.name], f.name))
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; known: {', '.join(sorted(MODELS))}")
        if self.dataset not in nndata.DATASETS:
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; known: {', '.join(sorted(nndata.DATASETS))}"
            )
        spec = nndata.get_spec(self.dataset)
        if model_input_shape(self.model) != spec.image_shape:
            raise ConfigError(
                f"model {self.model} expects inputs {model_input_shape(self.model)}, dataset "
                f"{self.dataset} has images {spec.image_shape}"
            )
        if self.score not in SCORE_MODES:
            raise ConfigError(f"score must be one of {SCORE_MODES}, got {self.score!r}")
        for name in ("alpha_fc", "alpha_conv"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("num_iters",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "prune_samples", "val_size", "train_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.early_stop_margin is not None and self.early_stop_margin < 0:
            raise ConfigError(f"early_stop_margin must be >= 0, got {self.early_stop_margin}")
        try:
            self.train_config()
            self.train_config(retrain_iteration=1)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def num_classes(self) -> int:
        """Number of classes of :attr:`dataset`."""
        return nndata.get_spec(self.dataset).num_classes

    def train_config(self, retrain_iteration: int | None = None) -> TrainConfig:
        """The :class:`TrainConfig` of the dense training, or of retraining in an iteration."""
        if retrain_iteration is None:
            epochs, lr, milestones = self.epochs, self.lr, self.milestones
            seed = derive_seed(self.seed, "dense")
        else:
            epochs, milestones = self.retrain_epochs, self.retrain_milestones
            lr = self.retrain_lr if self.retrain_lr is not None else self.lr
            seed = derive_seed(self.seed, "retrain", retrain_iteration)
        return TrainConfig(
            optimizer=self.optimizer, lr=lr, momentum=self.momentum,
            weight_decay=self.weight_decay, epochs=epochs, milestones=list(milestones),
            gamma=self.gamma, lr_schedule=self.lr_schedule, device=self.device, seed=seed,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a dict (e.g. a TOML file); unknown keys raise :class:`ConfigError`."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; valid: {', '.join(known)}")
        return cls(**dict(data))

    def config_hash(self) -> str:
        """8 hex digits identifying the settings (all but :data:`FREE_FIELDS`)."""
        fixed = {
            k: v
            for k, v in self.to_dict().items()
            if k not in FREE_FIELDS and not (k in LATER_FIELDS and LATER_FIELDS[k] == v)
        }
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:8]


def _convert(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a field's type hint (ints are accepted for floats)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_convert(v, args[0], name) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be of type {hint.__name__}, got {value!r}")
    return value


_LENET = {
    "optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-4, "batch_size": 120, "epochs": 60,
    "retrain_epochs": 60, "milestones": [30], "retrain_milestones": [30], "rewind": True,
}  # fmt: skip
_CIFAR_ADAM = {
    "optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-4, "batch_size": 120, "epochs": 150,
    "milestones": [80, 120], "retrain_epochs": 60, "retrain_milestones": [20, 40],
    "alpha_conv": 0.95, "alpha_fc": 0.95, "num_iters": 6, "rewind": False,
}  # fmt: skip
_RESNET_CIFAR10 = {
    "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 120, "epochs": 150,
    "milestones": [80, 120], "retrain_epochs": 60, "retrain_milestones": [20, 40],
    "alpha_conv": 0.95, "alpha_fc": 0.99, "num_iters": 10, "rewind": False,
}  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "model": "lenet300_100", "dataset": "mnist-sample", "optimizer": "adam", "lr": 1e-3,
        "weight_decay": 5e-4, "batch_size": 120, "epochs": 8, "retrain_epochs": 4, "milestones": [],
        "retrain_milestones": [], "alpha_fc": 0.95, "num_iters": 5, "rewind": True,
    },
    "lenet300-mnist": dict(model="lenet300_100", dataset="mnist", alpha_fc=0.95, num_iters=20, **_LENET),
    "lenet5-mnist": dict(model="lenet5", dataset="mnist", alpha_conv=0.9, alpha_fc=0.95, num_iters=10, **_LENET),
    "vgglike-cifar10": dict(model="vgg_like", dataset="cifar10", **_CIFAR_ADAM),
    "vgg16-cifar10": dict(model="vgg16", dataset="cifar10", **_CIFAR_ADAM),
    "resnet20-cifar10": dict(model="resnet20", dataset="cifar10", **_RESNET_CIFAR10),
    "resnet32-cifar10": dict(model="resnet32", dataset="cifar10", **_RESNET_CIFAR10),
    # Not in the paper: the common MobileNetV2 CIFAR recipe (SGD 0.1, momentum 0.9, wd 5e-4,
    # batch 128, 200 epochs cosine), retraining and alphas as for the ResNets.
    "mobilenetv2-cifar10": {
        "model": "mobilenetv2_cifar", "dataset": "cifar10", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
        "weight_decay": 5e-4, "batch_size": 128, "epochs": 200, "lr_schedule": "cosine", "milestones": [],
        "retrain_epochs": 60, "retrain_milestones": [], "alpha_conv": 0.95, "alpha_fc": 0.99, "num_iters": 10,
        "rewind": False,
    },
    "resnet56-cifar100": {
        "model": "resnet56", "dataset": "cifar100", "optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-4,
        "batch_size": 120, "epochs": 200, "milestones": [120, 160], "retrain_epochs": 80,
        "retrain_milestones": [30, 60], "alpha_conv": 0.95, "alpha_fc": 0.99, "num_iters": 10,
        "prune_samples": 2000, "rewind": False,
    },
}  # fmt: skip
"""Named settings of the paper's experiments (ALGORITHM.md) and a quick offline demo.

Batch size 120 and weight decay 5e-4 are the defaults of the authors' training script
where their table gives none; LeNets decay the learning rate after epoch 30 likewise."""


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML experiment file: top-level keys are :class:`ExperimentConfig` fields,
    plus an optional ``preset``. Needs Python >= 3.11 (``tomllib``) or ``tomli``."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(
                "reading TOML config files needs Python >= 3.11 or the 'tomli' package "
                "(pip install tomli)"
            ) from None
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None


def resolve_config(
    preset: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[ExperimentConfig, str]:
    """Merge defaults < preset < config file < ``overrides`` into a config.

    Returns the config and a label for its run folder (the preset's name, else
    ``<model>-<dataset>``). A ``preset`` argument wins over a ``preset`` key in the file.
    """
    values: dict[str, Any] = {}
    from_file = load_config_file(config_file) if config_file is not None else {}
    file_preset = from_file.pop("preset", None)
    preset = preset if preset is not None else file_preset
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(from_file)
    values.update(overrides or {})
    cfg = ExperimentConfig.from_dict(values)
    return cfg, preset if preset is not None else f"{cfg.model}-{cfg.dataset}"


def run_name(cfg: ExperimentConfig, label: str) -> str:
    """Folder name of a run: ``<label>-<config hash>``."""
    return f"{label}-{cfg.config_hash()}"


def _prepare_run_dir(cfg: ExperimentConfig, run_dir: Path) -> None:
    path = run_dir / CONFIG_FILE
    current = cfg.to_dict()
    if path.exists():
        stored = {**LATER_FIELDS, **json.loads(path.read_text())}
        diff = [k for k in current if k not in FREE_FIELDS and stored.get(k) != current[k]]
        if diff:
            details = ", ".join(f"{k}: stored={stored.get(k)!r} now={current[k]!r}" for k in diff)
            raise RunConflictError(
                f"run folder {run_dir} holds a run with other settings ({details}); "
                "choose another --run-dir or delete it"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunConflictError(f"{run_dir} is not empty and holds no {CONFIG_FILE}: not a run folder")
    save_text(json.dumps(current, indent=2) + "\n", path)


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
    config_path = path.parent / CONFIG_FILE
    cfg = ExperimentConfig.from_dict(json.loads(config_path.read_text())) if config_path.exists() else None
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
        raise ConfigError(f"{path} is not a readable state_dict file ({type(error).__name__})") from None
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # a training checkpoint (*.ckpt) or a loop state
    try:
        restore_masks(net, state)
    except (RuntimeError, KeyError) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"{path} does not fit model {model_name}: {first}") from None
    return net.eval(), cfg


class Experiment:
    """One run of an :class:`ExperimentConfig` in a run folder (resumable at any point).

    ``Experiment(cfg, "runs/x").run()`` trains the dense model (or loads it from the
    folder), then runs :func:`relieve` with :func:`nnrelief.training.fit` as the training
    function, each phase with its own per-epoch checkpoint. Killing the process at any
    moment and running again continues after the last finished epoch and yields the same
    history as an uninterrupted run (on CPU).

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
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.download = download
        self.progress = progress
        self.device = resolve_device(cfg.device)
        spec = nndata.get_spec(cfg.dataset)
        if cfg.data_dir is None and not spec.packaged:
            raise ConfigError(f"dataset {cfg.dataset!r} needs a data directory (data_dir)")
        self.augment = spec.augment if cfg.augment is None else cfg.augment
        self.train_set, self.val_set, self.test_set = self._load_data()
        _prepare_run_dir(cfg, self.run_dir)
        self.val_batches = self._eval_loader(self.val_set)
        self.test_batches = self._eval_loader(self.test_set)

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
        return nndata.BatchLoader(dataset, _EVAL_BATCH, shuffle=False, seed=0, device=self.device)

    def train_loader(self, *phase: object) -> nndata.BatchLoader:
        """Shuffled training batches of a phase (e.g. ("retrain", k)): the same for every
        method and every resumed run, as they depend only on the seed and the phase."""
        return nndata.BatchLoader(
            self.train_set, self.cfg.batch_size, shuffle=True,
            seed=derive_seed(self.cfg.seed, "batches", *phase), device=self.device,
            augment=self.augment,
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
        path = self.run_dir / "init.pt"
        if path.exists():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            save_torch(cpu_state(model), path)
        return model.to(self.device)

    def train_dense(self) -> nn.Module:
        """The dense trained model: loaded from ``trained.pt``, or trained (resumably)."""
        model = self.initial_model()
        trained = self.run_dir / "trained.pt"
        checkpoint = self.run_dir / "dense.ckpt"
        if trained.exists():
            model.load_state_dict(torch.load(trained, map_location="cpu", weights_only=True))
            logger.info("dense model loaded from %s", trained)
        else:
            logger.info("training the dense %s on %s", self.cfg.model, self.cfg.dataset)
            fit(model, self.train_loader("dense"), self.val_batches, self.cfg.train_config(),
                checkpoint_path=checkpoint, progress=self.progress)  # fmt: skip
            save_torch(cpu_state(model), trained)
        checkpoint.unlink(missing_ok=True)
        return model

    def _retrain(self, model: nn.Module, iteration: int) -> None:
        for stale in self.run_dir.glob("retrain-*.ckpt"):
            if stale.name != f"retrain-{iteration}.ckpt":
                stale.unlink()
        fit(model, self.train_loader("retrain", iteration), self.val_batches,
            self.cfg.train_config(retrain_iteration=iteration),
            checkpoint_path=self.run_dir / f"retrain-{iteration}.ckpt", progress=self.progress)  # fmt: skip

    def run(self) -> History:
        """Dense training (if not done yet) and the iterative procedure; the history."""
        model = self.train_dense()
        init = None
        if self.cfg.rewind:
            init = torch.load(self.run_dir / "init.pt", map_location="cpu", weights_only=True)

        def finished(record: IterationRecord) -> None:
            (self.run_dir / f"retrain-{record.iteration}.ckpt").unlink(missing_ok=True)

        history = relieve(
            model,
            prune_batches=self.pruning_batches,
            train_fn=self._retrain,
            eval_fns=self.eval_fns(),
            num_iters=self.cfg.num_iters,
            alpha_fc=self.cfg.alpha_fc,
            alpha_conv=self.cfg.alpha_conv,
            score=self.cfg.score,
            rewind_state=init,
            run_dir=self.run_dir,
            early_stop_margin=self.cfg.early_stop_margin,
            progress=self.progress,
            on_iteration_end=finished,
            history_extra={"config": self.cfg.to_dict()},
        )
        for stale in self.run_dir.glob("retrain-*.ckpt"):
            stale.unlink()
        return history
