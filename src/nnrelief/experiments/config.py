"""Settings of the paper's experiments: :class:`ExperimentConfig`, :data:`PRESETS` and
:func:`resolve_config` (defaults < preset < TOML file < flags).

A run folder is named from its settings (:func:`run_name`: label plus a hash of every
setting but :data:`FREE_FIELDS`), so runs with other settings never share a folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import data as nndata
from ..models import MODELS
from ..models import input_shape as model_input_shape
from ..pruning import SCORE_MODES
from ..training import TrainConfig


class ConfigError(ValueError):
    """An invalid experiment setting, preset, config file or run folder."""


class RunConflictError(ConfigError):
    """A run folder already holds a run with different settings."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed depending only on ``parts`` (e.g. the run seed, a purpose, an iteration)."""
    digest = hashlib.blake2b(repr(("nnrelief.iterative",) + parts).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


FREE_FIELDS = frozenset({"data_dir", "device", "num_iters", "world_size"})
# Recorded from the environment (torchrun's WORLD_SIZE), not settings: no command-line flag.
RECORDED_FIELDS = frozenset({"world_size"})
# Settings added after the first release: left out of the folder hash while at these
# defaults, and assumed to have them in run folders written before they existed.
LATER_FIELDS: dict[str, Any] = {"lr_schedule": "step", "amp": "off", "compile": False}


# Interval of every bounded number of ExperimentConfig ("(" open, "[" closed; None is allowed
# where the type allows it).
_RANGES: dict[str, str] = {
    "alpha_fc": "(0, 1]", "alpha_conv": "(0, 1]", "lr": "(0, inf)", "retrain_lr": "(0, inf)",
    "momentum": "[0, 1)", "weight_decay": "[0, inf)", "gamma": "(0, inf)", "early_stop_margin": "[0, inf)",
    "num_iters": "[0, inf)", "epochs": "[1, inf)", "retrain_epochs": "[1, inf)", "batch_size": "[1, inf)",
    "prune_samples": "[1, inf)", "val_size": "[1, inf)", "train_subset": "[1, inf)", "world_size": "[1, inf)",
}  # fmt: skip


# TrainConfig field of retraining -> the setting it comes from (lr: retrain_lr when given).
_RETRAIN_NAMES = {"epochs": "retrain_epochs", "milestones": "retrain_milestones"}


def _in_interval(value: float, interval: str) -> bool:
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


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
        amp: mixed precision of training on CUDA: ``off``, ``bf16`` or ``fp16`` (ignored
            on the CPU).
        compile: train through ``torch.compile``.
        early_stop_margin: stop when validation accuracy falls more than this fraction
            below the dense model's (``None``: run all iterations).
        train_subset: train on this many samples of the training split only (quick runs).
        world_size: processes running the experiment (``torchrun``; set by
            :class:`~nnrelief.experiments.experiment.Experiment`, not a setting: no flag, not
            in the folder hash). ``batch_size`` is the global batch, split evenly over them,
            so the learning rate and the results do not depend on it; a run may be resumed
            with another number of processes. ``config.json`` holds the number of the
            invocation that created the run, ``history.json`` that of the latest one.
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
    amp: str = "off"
    compile: bool = False
    world_size: int = 1

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(getattr(self, f.name), hints[f.name], f.name))
        self._check_numbers()
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
        for retrain_iteration, names in ((None, {}), (1, _RETRAIN_NAMES)):
            try:
                self.train_config(retrain_iteration)
            except ValueError as error:  # TrainConfig names its own field first: use the setting's name
                name, _, rest = str(error).partition(" ")
                name = "retrain_lr" if name == "lr" and retrain_iteration and self.retrain_lr is not None else names.get(name, name)
                raise ConfigError(f"setting {name} {rest}") from None

    def _check_numbers(self) -> None:
        """Every number finite and in its range (NaN fails every comparison, so check first); the
        batch and the pruning set large enough to split over the processes."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"setting {f.name} must be a finite number, got {value}")
        for name, interval in _RANGES.items():
            value = getattr(self, name)
            if value is not None and not _in_interval(value, interval):
                raise ConfigError(f"setting {name} must be in {interval}, got {value}")
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"batch_size {self.batch_size} is the global batch, split evenly over the {self.world_size} "
                f"processes: choose a multiple of {self.world_size}, or another number of processes"
            )
        if self.prune_samples < self.world_size:
            raise ConfigError(f"prune_samples must be >= the {self.world_size} processes, got {self.prune_samples}")

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
            amp=self.amp, compile=self.compile,
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
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a TOML file of settings")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file (not UTF-8); give a TOML file of settings") from None
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
