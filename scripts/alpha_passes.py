"""How fast each alpha_conv prunes a trained model, without retraining: successive NNrelief
passes on a run's trained weights, the remaining fraction after each.

    python scripts/alpha_passes.py RUN_DIR --alphas 0.85 0.9 0.93 0.95 --passes 8 [--data-dir DATA]

RUN_DIR is a run folder holding ``trained.pt`` (``nnrelief train``); its ``config.json`` gives
the model, dataset, alpha_fc, score and pruning-set size. Each pass streams the same pruning
set (drawn as the run's first iteration draws it) through the model as the previous pass left
it. Retraining between passes changes the statistics, so this ranks alphas; it does not
predict the run's iterations exactly.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch

import nnrelief
from nnrelief.experiments.config import ExperimentConfig
from nnrelief.experiments.experiment import Experiment, load_weights
from nnrelief.experiments.runfolder import CONFIG, TRAINED, RunFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.85, 0.9, 0.93, 0.95])
    parser.add_argument("--passes", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    folder = RunFolder(args.run_dir)
    settings = folder.read_json(CONFIG)
    if args.data_dir is not None:
        settings["data_dir"] = args.data_dir
    cfg = ExperimentConfig.from_dict(settings)
    with tempfile.TemporaryDirectory() as scratch, Experiment(cfg, scratch, progress=False) as experiment:
        batches = list(experiment.pruning_batches(1))  # the run folder itself is only read
    print(f"{cfg.model} on {cfg.dataset}, alpha_fc {cfg.alpha_fc}, score {cfg.score}, {cfg.prune_samples} samples")
    print("alpha_conv  remaining after each pass")
    for alpha in args.alphas:
        model, _ = load_weights(folder / TRAINED)
        remaining = []
        for _ in range(args.passes):
            report = nnrelief.prune(model, batches, alpha_fc=cfg.alpha_fc, alpha_conv=alpha, score=cfg.score, progress=False)
            remaining.append(f"{100 * report.remaining_fraction:6.2f}%")
        print(f"{alpha:<10g}  {' '.join(remaining)}")


if __name__ == "__main__":
    main()
