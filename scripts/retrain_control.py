"""What retraining alone does to a dense model: the run's trained weights retrained, without
pruning, as iterations 1..N of the run retrain (their batches, learning rate, schedule and
checkpoint choice on validation), test and validation accuracy after each.

    python scripts/retrain_control.py RUN_DIR OUT_DIR [--iterations N] [--data-dir DATA]

A pruned model that ends above the dense one has had more training than it; this is the
control that separates the extra training from the pruning. RUN_DIR (a run folder holding
``trained.pt``) is only read. OUT_DIR becomes a run folder of its own with the same settings:
each phase checkpoints every epoch there and its weights are kept (``control-K.pt``), so a
killed control resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging

import nnrelief.experiments.runfolder as files
from nnrelief.experiments.config import ExperimentConfig
from nnrelief.experiments.experiment import Experiment, load_weights
from nnrelief.experiments.runfolder import RunFolder
from nnrelief.fileio import cpu_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--iterations", type=int, default=1, help="retraining phases in a row (default: 1)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source = RunFolder(args.run_dir)
    settings = source.read_json(files.CONFIG)
    if args.data_dir is not None:
        settings["data_dir"] = args.data_dir
    cfg = ExperimentConfig.from_dict(settings)
    model, _ = load_weights(source / files.TRAINED)
    with Experiment(cfg, args.out_dir, progress=False) as experiment:
        lr = cfg.lr if cfg.retrain_lr is None else cfg.retrain_lr
        print(f"{cfg.model} on {cfg.dataset}: {cfg.retrain_epochs} retraining epochs a phase, lr {lr}")
        print(f"phase  val      test     (phase 0: the dense model of {args.run_dir})")
        model = model.to(experiment.device)
        report(0, experiment.accuracies(model))
        for phase in range(1, args.iterations + 1):
            name = f"control-{phase}.pt"
            if experiment.folder.exists(name):
                model.load_state_dict(experiment.folder.load(name))
            else:
                experiment.retrain(model, phase, method="control")
                experiment.folder.save(name, cpu_state(model))
                experiment.folder.remove(files.RETRAIN_CHECKPOINTS)
            report(phase, experiment.accuracies(model))


def report(phase: int, accuracies: dict[str, float]) -> None:
    print(f"{phase:<5d}  {100 * accuracies['val']:6.2f}%  {100 * accuracies['test']:6.2f}%", flush=True)


if __name__ == "__main__":
    main()
