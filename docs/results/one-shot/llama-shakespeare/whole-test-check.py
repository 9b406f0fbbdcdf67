"""Check: one-shot cells of the LM at 50% and 80% on the whole test split (draw 0).

Ran as is on the machine of the 2026-12-07 session (its paths: the one-shot run folder under
/work/runs, data in /work/shared/data); output in whole-test-check.json beside it.
"""

import json

import torch

from nnrelief.experiments.config import resolve_config
from nnrelief.experiments.experiment import Experiment
from nnrelief.experiments.oneshot import ONE_SHOT_METHODS, calibration_batches, remaining_fraction, scored_totals
from nnrelief.fileio import cpu_state
from nnrelief.training.loops import evaluate


def main() -> None:
    torch.set_num_threads(1)
    overrides = {"prune_samples": 128, "ignore": ["lm_head"], "data_dir": "/work/shared/data"}
    cfg, _ = resolve_config("llama-shakespeare", None, overrides)
    out = {}
    with Experiment(cfg, "/work/runs/llama-shakespeare-d668575d", progress=False) as experiment:
        dense = cpu_state(experiment.train_dense())
        batches = calibration_batches(experiment, 0)
        for method in ("dense", "nnrelief", "wanda", "magnitude"):
            for sparsity in (0.0,) if method == "dense" else (0.5, 0.8):
                model = experiment.initial_model()
                model.load_state_dict(dense)
                if method != "dense":
                    ONE_SHOT_METHODS[method].run(model, sparsity, batches, experiment)
                result = evaluate(model, experiment.test_batches, experiment.device)
                kept = remaining_fraction(model, scored_totals(model, experiment))
                out[f"{method}@{sparsity}"] = (result.bits_per_token, kept)
    with open("whole-test-check.json", "w") as file:
        json.dump(out, file, indent=1)


if __name__ == "__main__":
    main()
