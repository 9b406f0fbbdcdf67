"""What each pruning pass of a finished comparison costs before retraining, and how much of
it is BatchNorm's running statistics: test accuracy right after pass k, with the statistics
as the pass left them (those of the model before it) and recomputed on training batches.

    python scripts/pass_damage.py RUN_DIR [--methods nnrelief global-magnitude] [--iterations 1 2 3]
                                  [--bn-batches 40] [--data-dir DATA]

RUN_DIR is a run folder after ``nnrelief compare``. Pass k is redone on the weights the
method retrained in iteration k - 1 (``model-iter<k-1>.pt``, of the run folder for NNrelief,
of ``compare/<method>/`` for a baseline), with the run's pruning set of iteration k and the
baseline's own prune step, so the "stale" column reproduces the run's accuracy right after
pruning (printed beside it as a check). Recomputing the statistics takes the mean and
variance of every BatchNorm layer over ``--bn-batches`` augmented training batches, all
other layers in eval mode. Nothing is written; the run folder is only read.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Iterable

import torch
from torch import nn

import nnrelief
import nnrelief.experiments.runfolder as files
from nnrelief.experiments.compare import COMPARE_DIR
from nnrelief.experiments.config import ExperimentConfig
from nnrelief.experiments.experiment import Experiment, load_weights
from nnrelief.experiments.methods import Targets, get_method
from nnrelief.experiments.runfolder import RunFolder
from nnrelief.models import input_shape

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], limit: int) -> int:
    """Replace every BatchNorm layer's running mean and variance by their average over the
    first ``limit`` batches (the cumulative average of ``momentum=None``); every other layer
    stays in eval mode. Returns the number of batches used; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    used = 0
    for x, _ in batches:
        if used == limit:
            break
        model(x)
        used += 1
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--methods", nargs="+", default=["nnrelief", "global-magnitude"])
    parser.add_argument("--iterations", type=int, nargs="+", default=None, help="default: every iteration of the run")
    parser.add_argument("--bn-batches", type=int, default=40)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder = RunFolder(args.run_dir)
    settings = folder.read_json(files.CONFIG)
    if args.data_dir is not None:
        settings["data_dir"] = args.data_dir
    cfg = ExperimentConfig.from_dict(settings)
    reference = folder.read_history()
    targets = Targets.of(reference, cfg.seed, input_shape(cfg.model))
    iterations = args.iterations or [r.iteration for r in reference.records[1:]]
    print(f"{cfg.model} on {cfg.dataset}: test accuracy (%) right after pass k; BatchNorm statistics recomputed on "
          f"{args.bn_batches} training batches of {cfg.batch_size}")  # fmt: skip
    print("method            iter  recorded  stale   recomputed")
    with tempfile.TemporaryDirectory() as scratch, Experiment(cfg, scratch, progress=False) as experiment:
        for method in args.methods:
            method_folder = folder if method == "nnrelief" else RunFolder(folder / COMPARE_DIR / method)
            history = method_folder.read_history()
            for k in iterations:
                model, _ = load_weights(method_folder / files.model_file(k - 1), cfg.model, cfg.dataset)
                model = model.to(experiment.device)
                if method == "nnrelief":
                    keywords = cfg.pass_settings().at_iteration(k).keywords()
                    nnrelief.prune(model, experiment.pruning_batches(k), progress=False, **keywords)
                else:
                    get_method(method).step(targets)(model, k)
                stale = experiment.accuracies(model)["test"]
                recompute_batchnorm(model, experiment.train_loader("batchnorm", k), args.bn_batches)
                recomputed = experiment.accuracies(model)["test"]
                recorded = history.records[k].accuracy_before["test"]
                print(f"{method:<16}  {k:>4}  {100 * recorded:7.2f}  {100 * stale:6.2f}  {100 * recomputed:9.2f}", flush=True)


if __name__ == "__main__":
    main()
