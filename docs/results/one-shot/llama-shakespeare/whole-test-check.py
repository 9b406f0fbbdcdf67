"""Check: one-shot cells of the LM at 50% and 80% on the whole test split (draw 0). Ran as is on the machine of
the 2026-12-07 session (its paths: the one-shot run folder under /work/runs, data in /work/shared/data)."""
import json

import torch

torch.set_num_threads(1)
from nnrelief.experiments.config import resolve_config
from nnrelief.experiments.experiment import Experiment
from nnrelief.experiments.oneshot import ONE_SHOT_METHODS, calibration_batches, remaining_fraction, scored_totals
from nnrelief.fileio import cpu_state
from nnrelief.training.loops import evaluate

cfg, _ = resolve_config("llama-shakespeare", None, {"prune_samples": 128, "ignore": ["lm_head"], "data_dir": "/work/shared/data"})
out = {}
with Experiment(cfg, "/work/runs/llama-shakespeare-d668575d", progress=False) as ex:
    dense = cpu_state(ex.train_dense())
    batches = calibration_batches(ex, 0)
    for method in ("dense", "nnrelief", "wanda", "magnitude"):
        for sparsity in ((0.0,) if method == "dense" else (0.5, 0.8)):
            model = ex.initial_model(); model.load_state_dict(dense)
            if method != "dense":
                ONE_SHOT_METHODS[method].run(model, sparsity, batches, ex)
            r = evaluate(model, ex.test_batches, ex.device)
            out[f"{method}@{sparsity}"] = (r.bits_per_token, remaining_fraction(model, scored_totals(model, ex)))
            print(method, sparsity, out[f"{method}@{sparsity}"], flush=True)
json.dump(out, open("/work/runs/lm-fulltest.json", "w"), indent=1)
