"""Training and evaluation of dense and pruned models.

The package by responsibility: :mod:`.config` (:class:`TrainConfig`, device names),
:mod:`.loops` (one pass: :func:`evaluate`, :func:`train_epoch`), :mod:`.fitting`
(:func:`fit`), :mod:`.checkpoint` (the per-epoch checkpoint and resuming from it) and
:mod:`.parallel` (every torch.distributed call of training).

Design points:

* The data are any iterable of ``(x, y)`` tensor batches with ``len()``. When the object
  has a ``set_epoch(epoch)`` method it is called (with the 0-based epoch index) before each
  pass over it, so shuffling can depend only on ``(seed, epoch)``.
* Pruned models keep their pruned weights at exactly zero through any ``torch.optim``
  optimizer (:mod:`nnrelief.pruning.masks`: gradients masked, pruned entries zeroed again
  after every step), whatever its momentum or weight decay would do.
* :func:`fit` selects the best epoch on a *validation* split (never the test set), can
  write an atomic checkpoint after every epoch and resume from it bit-exactly on CPU.
* On CUDA: mixed precision with ``TrainConfig.amp`` (``"bf16"``: autocast only;
  ``"fp16"``: autocast + ``GradScaler``), channels_last memory format for conv nets,
  cuDNN benchmark mode, fused optimizers and optionally ``torch.compile``. The CPU path
  never touches any of them. Losses and accuracies are summed on the device and read once
  per epoch: the training step never waits for the device.
* A training loss that becomes NaN or inf stops :func:`fit` with
  :class:`TrainingDivergedError` (checked once per epoch); the model keeps its last good
  weights and the checkpoint stays at the last good epoch.
"""

from .checkpoint import EpochRecord
from .config import AMP_MODES, LR_SCHEDULES, OPTIMIZERS, TrainConfig, resolve_device
from .fitting import FitResult, TrainingDivergedError, fit, make_optimizer, make_scheduler, seed_everything
from .loops import Batches, EvalResult, evaluate, train_epoch

__all__ = [
    "AMP_MODES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "Batches",
    "EpochRecord",
    "EvalResult",
    "FitResult",
    "TrainConfig",
    "TrainingDivergedError",
    "evaluate",
    "fit",
    "make_optimizer",
    "make_scheduler",
    "resolve_device",
    "seed_everything",
    "train_epoch",
]
