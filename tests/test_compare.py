"""``nnrelief compare``: NNrelief vs magnitude, global magnitude, random and L1-filter pruning."""

from __future__ import annotations

import csv
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from nnrelief.cli import main
from nnrelief.experiments.compare import DEFAULT_METHODS, markdown_heading, run_comparison
from nnrelief.experiments.config import ConfigError, ExperimentConfig
from nnrelief.reporting.results import run_results

SMALL = [
    "--preset", "demo", "--epochs", "1", "--retrain-epochs", "1", "--train-subset", "1000",
    "--val-size", "500", "--prune-samples", "300", "--device", "cpu", "--no-progress",
    "--threads", "1", "-q",
]  # fmt: skip
LAYERS = ["fc1", "fc2", "fc3"]
METHODS = list(DEFAULT_METHODS)  # what runs without --methods
BASELINES = METHODS[1:]



@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """A comparison of all methods over 2 iterations; returns the run folder."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    assert main(["compare", *SMALL, "--num-iters", "2", "--runs-root", str(root)]) == 0
    torch.set_num_threads(threads)
    (run,) = [p for p in root.iterdir() if p.name != "dense"]  # beside the run: its shared dense model
    return run


def read_rows(run: Path) -> list[dict[str, str]]:
    with (run / "compare" / "compare.csv").open() as f:
        return list(csv.DictReader(f))


def by_method(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    result: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        result.setdefault(row["method"], []).append(row)
    return result


def masks(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.bool() for key, value in state.items() if key.endswith("_mask")}


def test_files_and_tables(compared):
    folder = compared / "compare"
    assert METHODS[0] == "nnrelief" and "l1-filter" not in METHODS  # the reference first; l1-filter only when named
    for figure in ("compare.png", "compare-macs.png"):
        data = (folder / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert 800 <= width <= 4000 and 300 <= height <= 3000
    rows = read_rows(compared)
    assert [(row["method"], row["iteration"]) for row in rows] == [(m, str(k)) for m in METHODS for k in range(3)]
    payload = json.loads((folder / "compare.json").read_text())
    assert payload["methods"] == list(METHODS)
    assert len(payload["rows"]) == len(rows)
    assert payload["layer_totals"] == {"fc1": 235500, "fc2": 30100, "fc3": 1010}
    text = (folder / "compare.md").read_text()
    assert "](compare.png)" in text and "](compare-macs.png)" in text
    table_rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table_rows) == 3 * 3  # after retraining, right after pruning, weights/MACs; iterations 0-2
    assert table_rows[-1].split("|")[2].strip() == f"{float(rows[2]['remaining_percent']):.2f} / {int(rows[2]['macs_sparse']):,}"
    header = next(line for line in text.splitlines() if line.startswith("| iter"))
    assert [cell.strip() for cell in header.strip("|").split("|")][3:] == list(METHODS)
    for method in BASELINES:
        assert (folder / method / "history.json").is_file() and (folder / method / "relief_state.pt").is_file()
        assert not list((folder / method).glob("retrain-*.ckpt"))


def test_equal_remaining_counts(compared):
    methods = by_method(read_rows(compared))
    reference = methods["nnrelief"]
    for k in range(3):
        target = {layer: int(reference[k][f"kept:{layer}"]) for layer in LAYERS}
        assert sum(target.values()) == int(reference[k]["params_remaining"])
        for method in ("magnitude", "random"):
            assert {layer: int(methods[method][k][f"kept:{layer}"]) for layer in LAYERS} == target
        glob = methods["global-magnitude"][k]
        assert sum(int(glob[f"kept:{layer}"]) for layer in LAYERS) == sum(target.values())
        for method in BASELINES:
            assert methods[method][k]["params_remaining"] == reference[k]["params_remaining"]
    assert int(reference[2]["params_remaining"]) < int(reference[1]["params_remaining"]) < int(reference[0]["params_remaining"])


def test_same_dense_start(compared):
    methods = by_method(read_rows(compared))
    start = {key: methods["nnrelief"][0][key] for key in ("val_acc_after", "test_acc_after", "params_remaining")}
    for method in BASELINES:
        assert {key: methods[method][0][key] for key in start} == start
    dense = torch.load(compared / "model-iter0.pt", weights_only=True)
    for method in BASELINES:
        state = torch.load(compared / "compare" / method / "model-iter0.pt", weights_only=True)
        assert state.keys() == dense.keys() and all(torch.equal(state[k], dense[k]) for k in dense)


def test_masks_only_shrink(compared):
    folders = {"nnrelief": compared} | {method: compared / "compare" / method for method in BASELINES}
    for method, folder in folders.items():
        previous: dict[str, torch.Tensor] = {}
        for k in range(3):
            current = masks(folder / f"model-iter{k}.pt")
            assert bool(current) == (k > 0), method
            for key, mask in current.items():
                if key in previous:
                    assert bool((mask <= previous[key]).all()), (method, k, key)
            previous = current


def test_resume_extends_every_method(compared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(compared, run)
    before = by_method(read_rows(run))
    compare = run / "compare"
    own, mine = compare / ".compare.ab12cd34.tmp.csv", compare / ".notes.ab12cd34.tmp.txt"
    magnitude_temp, random_temp = compare / "magnitude" / ".history.q1w2e3r4.tmp.csv", compare / "random" / ".history.q1.tmp.csv"
    for path in (own, mine, magnitude_temp, random_temp):
        path.write_text("left by a killed write")
    latest = compare / "magnitude" / "model-iter2.pt"
    good = latest.read_bytes()
    latest.write_bytes(good[: len(good) // 2])  # damaged: rebuilt from the baseline's state
    threads = torch.get_num_threads()
    assert main(["compare", *SMALL, "--num-iters", "3", "--run-dir", str(run), "--methods", "magnitude"]) == 0
    torch.set_num_threads(threads)
    assert latest.read_bytes() == good
    # the comparison's own temporary files and those of the baseline it ran are gone; the
    # random baseline (not run now: nobody writes its folder) and other files keep theirs
    assert not own.exists() and not magnitude_temp.exists() and mine.exists() and random_temp.exists()
    after = by_method(read_rows(run))
    assert list(after) == ["nnrelief", "magnitude"]
    assert len(after["magnitude"]) == len(after["nnrelief"]) == 4
    assert after["magnitude"][:3] == before["magnitude"]  # finished iterations were not redone
    assert after["magnitude"][3]["kept:fc1"] == after["nnrelief"][3]["kept:fc1"]


def test_unknown_method():
    known = "nnrelief, magnitude, global-magnitude, random, l1-filter, row-magnitude, wanda, wanda-mean"
    with pytest.raises(ConfigError, match=f"unknown method 'pruneall'; known: {known}$"):
        run_comparison(None, ["nnrelief", "pruneall"])  # type: ignore[arg-type]


def test_methods_flag_is_checked(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "pruneall"])
    assert "invalid choice" in capsys.readouterr().err


def test_each_training_phase_is_named_after_its_method(tmp_path, monkeypatch):
    """fit's phase name (progress bars, logs, divergence errors) says which method retrains."""
    import nnrelief.experiments.experiment as experiment_module
    from nnrelief.experiments.config import ExperimentConfig
    from nnrelief.experiments.experiment import Experiment

    phases: list[str] = []
    real_fit = experiment_module.fit

    def recording_fit(*args, desc: str = "training", **kwargs):
        phases.append(desc)
        return real_fit(*args, desc=desc, **kwargs)

    monkeypatch.setattr(experiment_module, "fit", recording_fit)
    cfg = ExperimentConfig(model="lenet300_100", dataset="mnist-sample", epochs=1, retrain_epochs=1, milestones=[],
                           retrain_milestones=[], train_subset=500, val_size=300, prune_samples=200, num_iters=1,
                           device="cpu")  # fmt: skip
    run_comparison(Experiment(cfg, tmp_path / "run", progress=False), ["nnrelief", "random"], progress=False)
    assert phases == ["dense training", "retraining, iteration 1", "random retraining, iteration 1"]


def l1_rows(run: Path) -> list[dict[str, str]]:
    return [row for row in read_rows(run) if row["method"] == "l1-filter"]


def test_l1_filter_matches_macs_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    """LeNet-5 on the demo settings: l1-filter prunes conv2's filters (conv1 is the stem) to
    NNrelief's MACs at each iteration; killed after its pass of iteration 2 it resumes there,
    to the rows and weights of an uninterrupted run."""
    import nnrelief.experiments.experiment as experiment_module

    l1 = [*SMALL, "--model", "lenet5", "--num-iters", "2", "--methods", "l1-filter"]
    threads = torch.get_num_threads()
    assert main(["compare", *l1, "--run-dir", str(tmp_path / "whole")]) == 0
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "compare")
    real_retrain = experiment_module.Experiment.retrain

    def killed(self, model, iteration, folder=None, method=None):
        if method == "l1-filter" and iteration == 2:
            raise KeyboardInterrupt
        return real_retrain(self, model, iteration, folder, method)

    monkeypatch.setattr(experiment_module.Experiment, "retrain", killed)
    assert main(["compare", *l1, "--run-dir", str(tmp_path / "cut")]) == 130
    state = torch.load(tmp_path / "cut" / "compare" / "l1-filter" / "relief_state.pt", weights_only=False)
    assert state["phase"] == "pruned" and state["pending"]["iteration"] == 2
    monkeypatch.setattr(experiment_module.Experiment, "retrain", real_retrain)
    assert main(["compare", *l1, "--run-dir", str(tmp_path / "cut")]) == 0
    torch.set_num_threads(threads)
    whole, cut = by_method(read_rows(tmp_path / "whole")), by_method(read_rows(tmp_path / "cut"))
    assert list(whole) == ["nnrelief", "l1-filter"] and cut == whole
    final = [torch.load(run / "compare" / "l1-filter" / "model-iter2.pt", weights_only=True) for run in (tmp_path / "whole", tmp_path / "cut")]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    reference, rows = whole["nnrelief"], whole["l1-filter"]
    filters = [int(row["alive:conv2"]) for row in rows]
    assert filters[0] == 50 > filters[1] >= filters[2] and all(int(row["alive:conv1"]) == 20 for row in rows)
    for k in (1, 2):
        target = int(reference[k]["macs_sparse"])
        assert abs(int(rows[k]["macs_sparse"]) - target) <= 20_000, "within half a conv2 filter (20*25*64 + 16*500 MACs)"
    history = json.loads((tmp_path / "whole" / "compare" / "l1-filter" / "history.json").read_text())
    assert history["iterations"][1]["report"]["settings"]["macs"] == int(rows[1]["macs_sparse"])
    baselines = run_results(tmp_path / "whole")["baselines"]  # the rows of `nnrelief report --json`
    assert [(b["method"], b["iteration"], b["macs"], b["params_remaining"]) for b in baselines] == [
        ("l1-filter", k, int(rows[k]["macs_sparse"]), int(rows[k]["params_remaining"])) for k in (1, 2)
    ]
    assert [b["test_accuracy"] for b in baselines] == [float(rows[k]["test_acc_after"]) for k in (1, 2)]


def test_l1_filter_on_a_net_without_convs_is_refused_before_anything_runs(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["compare", *SMALL, "--num-iters", "1", "--methods", "l1-filter", "--run-dir", str(run)]) == 1
    assert "method l1-filter cannot prune lenet300_100: LeNet300100 has no conv layer" in capsys.readouterr().err
    assert not (run / "trained.pt").exists()


@pytest.mark.parametrize(
    "methods,epochs,title,settings",
    [
        (["nnrelief", "magnitude"], 1, "# Pruning methods at NNrelief's remaining weights", "1 retraining epoch per iteration"),
        (["nnrelief", "l1-filter", "random"], 3, "# Pruning methods at NNrelief's remaining weights or MACs",
         "3 retraining epochs per iteration"),
        (["nnrelief"], 2, "# NNrelief alone (no baseline ran)", "2 retraining epochs per iteration"),
    ],
)  # fmt: skip
def test_compare_md_names_only_the_methods_that_ran(methods, epochs, title, settings):
    lines = markdown_heading(ExperimentConfig(retrain_epochs=epochs), methods)
    assert lines[0] == title and settings in lines[2]
    named = [line[2:].split(":")[0] for line in lines if line.startswith("* ")]
    assert named == methods[1:]
    assert ("MACs" in lines[0]) == ("l1-filter" in methods)
