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
import shlex
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import data as nndata
from ..models import MODELS
from ..models import input_shape as model_input_shape
from ..pruning.choices import parse_nm
from ..pruning.pass_settings import DEFAULTS, SCORE_MODES, PassSettings
from ..pruning.selection import check_nm
from ..settings import check_keys, check_value, document, flag_of, like, setting, spec_of, specs, suggestion
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
# Settings added after the first release: left out of the folder hash while at these
# defaults, and assumed to have them in run folders written before they existed.
LATER_FIELDS: dict[str, Any] = {
    "lr_schedule": "step", "amp": "off", "compile": False, "ignore": [], "only": [], "alphas": [], "target_remaining": None,
    "steps_per_epoch": None, "nm": None,
}  # fmt: skip


def _patterns(name: str, value: Any) -> Any:
    """Layer name patterns (one alone is a list of one), each non-empty without surrounding spaces."""
    items = [value] if isinstance(value, str) else value
    for item in items if isinstance(items, (list, tuple)) else ():
        if isinstance(item, str) and (not item or item != item.strip()):
            raise ValueError(f"{name} takes layer name patterns such as 'fc3' or 'features.*', got {item!r}")
    return items


def _alpha_entries(name: str, value: Any) -> Any:
    """``PATTERN=ALPHA`` entries (a TOML table ``{pattern = alpha}`` in its order) with ALPHA in
    (0, 1], spelled ``pattern=float``; a pattern may appear once."""
    if isinstance(value, Mapping):
        value = [f"{pattern}={alpha}" for pattern, alpha in value.items()]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        return items  # the type check names it
    entries: dict[str, float] = {}
    for item in items:
        pattern, _, text = str(item).rpartition("=")
        alpha = _number(text)
        if not pattern.strip() or not 0.0 < alpha <= 1.0:
            raise ValueError(f"{name} entries are PATTERN=ALPHA with ALPHA in (0, 1], e.g. 'classifier.*=0.99'; got {item!r}")
        if pattern.strip() in entries:
            raise ValueError(f"{name} gives pattern {pattern.strip()!r} twice (the first match wins): keep one")
        entries[pattern.strip()] = alpha
    return [f"{pattern}={alpha!r}" for pattern, alpha in entries.items()]


def _nm_text(name: str, value: Any) -> Any:
    """N:M sparsity as ``"N:M"`` (given so, or as a pair [N, M]), with 0 < N < M."""
    if value is None:
        return None
    try:
        n, m = parse_nm(value) if isinstance(value, str) else check_nm(value)
    except ValueError:
        raise ValueError(f"{name} is written N:M with whole numbers 0 < N < M (N of every M consecutive inputs kept), "
                         f"e.g. 2:4; got {value!r}") from None  # fmt: skip
    return f"{n}:{m}"


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


# TrainConfig field of retraining -> the setting it comes from (lr: retrain_lr when given).
_RETRAIN_NAMES = {"epochs": "retrain_epochs", "milestones": "retrain_milestones"}


@document
@dataclass
class ExperimentConfig:
    """All settings of one paper-style experiment (dense training + iterative pruning).

    Each field declares its help, range and choices once (:func:`nnrelief.settings.setting`):
    the checks here, the command-line flags, the TOML key check and ``--help`` read them.
    ``world_size`` is recorded by :class:`~nnrelief.experiments.experiment.Experiment`
    (torchrun), not a setting: no flag, not in the folder hash; ``batch_size`` is the global
    batch, split evenly over the processes, so the learning rate and the results do not
    depend on their number and a run may be resumed with another one. ``config.json`` holds
    the number of the invocation that created the run, ``history.json`` that of the latest one."""

    model: str = setting("lenet300_100", help="network architecture: " + ", ".join(sorted(MODELS)), metavar="NAME")
    dataset: str = setting(
        "mnist", metavar="NAME", help="dataset: " + ", ".join(sorted(nndata.DATASETS)) + " (fixes the number of classes)"
    )
    data_dir: str | None = setting(None, help="folder holding the dataset files (not needed for mnist-sample)", metavar="DIR")
    epochs: int = like(TrainConfig, "epochs", 60, help="epochs of dense training")
    retrain_epochs: int = like(TrainConfig, "epochs", 60, help="epochs of retraining after each pruning pass")
    optimizer: str = like(TrainConfig, "optimizer", "adam")
    lr: float = like(TrainConfig, "lr", 1e-3, help="learning rate of dense training")
    retrain_lr: float | None = like(TrainConfig, "lr", None, help="learning rate of retraining ('none': same as --lr)")
    momentum: float = like(TrainConfig, "momentum", 0.9)
    weight_decay: float = like(TrainConfig, "weight_decay", 5e-4)
    batch_size: int = setting(120, help="training batch size (the global batch under torchrun)", range="[1, inf)")
    steps_per_epoch: int | None = setting(
        None, range="[1, inf)", help="training batches per epoch of a text dataset, each of windows drawn at random anew "
        "('none': as many as one pass over the training tokens takes)",
    )  # fmt: skip
    milestones: list[int] = like(TrainConfig, "milestones", factory=lambda: [30],
                                 help="dense-training epochs after which the learning rate decays (none = no decay)")
    retrain_milestones: list[int] = like(TrainConfig, "milestones", factory=lambda: [30],
                                         help="retraining epochs after which the learning rate decays")
    gamma: float = like(TrainConfig, "gamma", 0.1)
    lr_schedule: str = like(TrainConfig, "lr_schedule", "step",
                            help="learning-rate schedule of every phase: 'step' (decay at the milestones) or "
                            "'cosine' (annealing to 0 over the phase's epochs)")
    alpha_fc: float = setting(DEFAULTS.alpha_fc, help="fraction of each neuron's signal kept in fully connected layers", range="(0, 1]")
    alpha_conv: float = setting(DEFAULTS.alpha_conv, help="fraction of each filter's signal kept in conv layers", range="(0, 1]")
    score: str = setting(DEFAULTS.score, choices=SCORE_MODES,
                         help="conv score: 'paper' (the paper's formula) or 'authors' (the authors' code)")
    ignore: list[str] = setting(factory=list, metavar="PATTERN", convert=_patterns,
                                help="layers every pass leaves whole: name glob patterns, e.g. 'fc3' 'features.*'")
    only: list[str] = setting(factory=list, metavar="PATTERN", convert=_patterns,
                              help="prune only the layers matching these name glob patterns (the others stay whole)")
    alphas: list[str] = setting(factory=list, metavar="PATTERN=ALPHA", convert=_alpha_entries,
                                help="per-layer alpha instead of --alpha-fc/--alpha-conv, first match wins, e.g. "
                                "'features.0=0.8' 'classifier.*=0.99' (TOML: a table {pattern = alpha})")
    target_remaining: float | None = setting(
        None, range="(0, 1)", help="each pass keeps this fraction of what the previous one left (iteration k prunes to "
        "target_remaining**k of the scored weights) with one alpha for every layer, found by bisection ('none': the alphas)",
    )  # fmt: skip
    nm: str | None = setting(
        None, metavar="N:M", convert=_nm_text, help="N:M sparsity instead of the alpha rule: per neuron, each group of M "
        "consecutive inputs (conv: input channels' kernels) keeps its N best connections, e.g. 2:4 ('none': the alpha rule)",
    )  # fmt: skip
    num_iters: int = setting(10, help="pruning iterations (may be raised to extend a finished run)", range="[0, inf)")
    prune_samples: int = setting(1000, range="[1, inf)",
                                 help="training samples in the pruning set, drawn anew each iteration (seeded by seed and the iteration)")
    val_size: int | None = setting(None, range="[1, inf)",
                                   help="validation samples held out of the training data ('none': dataset default); "
                                   "the best epoch is chosen on them, never on the test set")
    augment: bool | None = setting(None, help="crop + flip augmentation of training batches (default: dataset's choice)")
    rewind: bool = setting(False, help="rewind surviving weights to their initial values before retraining "
                           "(the paper's LeNet procedure) instead of fine-tuning")
    seed: int = setting(0, help="seed of initialisation, splits, batches and pruning sets")
    device: str = like(TrainConfig, "device", "auto")
    early_stop_margin: float | None = setting(None, range="[0, inf)",
                                              help="stop when validation accuracy falls more than this fraction (0.01 = 1 point) "
                                              "below the dense model's; keep the last iteration within it ('none': run all)")
    train_subset: int | None = setting(None, help="train on this many training samples only (quick runs)", range="[1, inf)")
    amp: str = like(TrainConfig, "amp", "off")
    compile: bool = like(TrainConfig, "compile", False)
    world_size: int = setting(1, help="processes running the experiment (recorded from torchrun)", range="[1, inf)", flag=False)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            spec, value = spec_of(f), getattr(self, f.name)
            try:
                value = _convert(value if spec.convert is None else spec.convert(f.name, value), hints[f.name], f.name)
                setattr(self, f.name, check_value(f.name, value, spec))
            except ValueError as error:
                raise _setting_error(f.name, str(error).partition(" ")[2]) from None
        self._check_processes()
        self._check_model_and_dataset()
        if self.target_remaining is not None and self.alphas:
            raise ConfigError("setting alphas has no effect with target_remaining (one alpha for every layer is searched): "
                              "give one of --alphas and --target-remaining")  # fmt: skip
        self._check_nm()
        for retrain_iteration, names in ((None, {}), (1, _RETRAIN_NAMES)):
            try:
                self.train_config(retrain_iteration)
            except ValueError as error:  # TrainConfig names its own field first: use the setting's name
                name, _, rest = str(error).partition(" ")
                name = "retrain_lr" if name == "lr" and retrain_iteration and self.retrain_lr is not None else names.get(name, name)
                raise _setting_error(name, rest) from None

    def _check_nm(self) -> None:
        """``nm`` alone: not with the settings of the alpha rule it replaces."""
        if self.nm is None:
            return
        try:
            self.pass_settings()
        except ValueError as error:
            raise ConfigError(f"setting {error} (flags --alpha-fc, --alpha-conv, --alphas, --target-remaining; a preset's "
                              f"alphas too: give --alpha-fc {DEFAULTS.alpha_fc} --alpha-conv {DEFAULTS.alpha_conv})") from None  # fmt: skip

    def _check_processes(self) -> None:
        """The batch and the pruning set large enough to split over the processes."""
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"batch_size {self.batch_size} is the global batch, split evenly over the {self.world_size} "
                f"processes: choose a multiple of {self.world_size}, or another number of processes"
            )
        if self.prune_samples < self.world_size:
            raise ConfigError(f"prune_samples must be >= the {self.world_size} processes, got {self.prune_samples}")

    def _check_model_and_dataset(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}{suggestion(self.model, MODELS)}; known: {', '.join(sorted(MODELS))}")
        if self.dataset not in nndata.DATASETS:
            known = nndata.DATASETS
            raise ConfigError(f"unknown dataset {self.dataset!r}{suggestion(self.dataset, known)}; known: {', '.join(sorted(known))}")
        problem = input_mismatch(self.model, self.dataset)
        if problem is not None:
            raise ConfigError(problem.replace(" takes ", " expects ", 1))
        self._check_task_settings()

    def _check_task_settings(self) -> None:
        """Refuse settings that do not apply to the dataset's kind (images or text)."""
        if nndata.get_spec(self.dataset).task == "next-token":
            given = {"val_size": self.val_size, "train_subset": self.train_subset, "augment": self.augment}
            for name in (name for name, value in given.items() if value is not None):
                raise ConfigError(f"setting {name} does not apply to the text dataset {self.dataset} (it holds out whole "
                                  f"works for validation and test; --steps-per-epoch sets an epoch's length): leave {flag_of(name)} out")  # fmt: skip
        elif self.steps_per_epoch is not None:
            raise ConfigError(f"setting steps_per_epoch applies to text datasets only; {self.dataset} is an image "
                              "dataset (an epoch is one pass over its training images): leave --steps-per-epoch out")  # fmt: skip

    @property
    def is_language_model(self) -> bool:
        """Whether the run trains a language model (a text dataset): judged by its
        validation loss (bits per token), not by accuracy."""
        return nndata.get_spec(self.dataset).task == "next-token"

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
            amp=self.amp, compile=self.compile, metric="loss" if self.is_language_model else "accuracy",
        )  # fmt: skip

    @property
    def alpha_map(self) -> dict[str, float]:
        """:attr:`alphas` as :func:`nnrelief.prune` takes them: pattern -> alpha, in order."""
        return {pattern: float(alpha) for pattern, _, alpha in (entry.rpartition("=") for entry in self.alphas)}

    def pass_settings(self) -> PassSettings:
        """The settings of every NNrelief pass of the run (``target_remaining`` is the
        per-pass fraction, :meth:`PassSettings.at_iteration`)."""
        return PassSettings(alpha_fc=self.alpha_fc, alpha_conv=self.alpha_conv, score=self.score, ignore=tuple(self.ignore),
                            only=tuple(self.only), alphas=self.alpha_map, target=self.target_remaining,
                            nm=None if self.nm is None else parse_nm(self.nm))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a dict (e.g. a TOML file); unknown keys raise :class:`ConfigError`."""
        try:
            check_keys(data, specs(cls), "ExperimentConfig")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return cls(**dict(data))

    def config_hash(self) -> str:
        """8 hex digits identifying the settings (all but :data:`FREE_FIELDS`)."""
        fixed = {
            k: v
            for k, v in self.to_dict().items()
            if k not in FREE_FIELDS and not (k in LATER_FIELDS and LATER_FIELDS[k] == v)
        }
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:8]


# Recorded from the environment (torchrun's WORLD_SIZE), not settings: no command-line flag.
RECORDED_FIELDS = frozenset(name for name, spec in specs(ExperimentConfig).items() if not spec.flag)


def input_mismatch(model: str, dataset: str) -> str | None:
    """Why the registered ``model`` cannot take the samples of ``dataset`` (None if it can):
    an image classifier needs the dataset's image shape, a language model a text dataset."""
    shape, spec = tuple(model_input_shape(model)), nndata.get_spec(dataset)
    text, sequences = spec.task == "next-token", len(shape) == 1
    if text != sequences:
        takes = "token sequences" if sequences else f"images {shape}"
        holds = "text" if text else f"images {tuple(spec.image_shape)}"
        return f"model {model} takes {takes}, but dataset {dataset} holds {holds}"
    if not text and shape != tuple(spec.image_shape):
        return f"model {model} takes inputs {shape}, but dataset {dataset} has images {tuple(spec.image_shape)}"
    return None


def _setting_error(name: str, problem: str) -> ConfigError:
    """``setting <name> <problem>``, naming the setting's flag where it has one."""
    flag = f" (flag {flag_of(name)})" if specs(ExperimentConfig)[name].flag else ""
    return ConfigError(f"setting {name} {problem}{flag}")


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
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_convert(v, args[0], name) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be of type {hint.__name__}, got {value!r}")
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
    # Not in the paper: a byte-level Llama decoder (RMSNorm, rotary, SwiGLU; 3.4M parameters, context 256) trained on
    # the Shakespeare corpus in under an hour on a shared 2-core CPU (one torch thread): 10 epochs of 200 batches of 16
    # random windows of 256 bytes (8.2M tokens, 1.8 passes over the training works), cosine schedule.
    "llama-shakespeare": {
        "model": "byte_llama", "dataset": "shakespeare", "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.01,
        "batch_size": 16, "steps_per_epoch": 200, "epochs": 10, "lr_schedule": "cosine", "milestones": [],
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
    try:
        check_keys(from_file, ["preset", *specs(ExperimentConfig)], f"config file {config_file}")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    file_preset = from_file.pop("preset", None)
    preset = preset if preset is not None else file_preset
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}{suggestion(preset, PRESETS)}; known: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(from_file)
    values.update(overrides or {})
    cfg = ExperimentConfig.from_dict(values)
    return cfg, preset if preset is not None else f"{cfg.model}-{cfg.dataset}"


def run_name(cfg: ExperimentConfig, label: str) -> str:
    """Folder name of a run: ``<label>-<config hash>``."""
    return f"{label}-{cfg.config_hash()}"


_COMMAND_SKIP = frozenset({"data_dir", "device"})  # where a run reads and runs, not what it is


def reproduce_command(cfg: ExperimentConfig, data_dir: str = "DATA") -> str:
    """An ``nnrelief prune`` command line that gives every setting of ``cfg`` explicitly
    (so it does not depend on presets changing), reading the data from ``data_dir``."""
    defaults = ExperimentConfig().to_dict()
    words = ["nnrelief", "prune"]
    for name, value in cfg.to_dict().items():
        default = defaults[name] == value and name not in ("model", "dataset")
        if name in _COMMAND_SKIP or not specs(ExperimentConfig)[name].flag or default:
            continue
        words += _flag_words(name, value)
    words += ["--data-dir", data_dir]
    return shlex.join(words)


def _flag_words(name: str, value: Any) -> list[str]:
    """The command-line words giving the setting ``name`` the value ``value``."""
    flag = flag_of(name)
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        return [flag, *map(str, value)]
    return [flag, "none" if value is None else str(value)]
