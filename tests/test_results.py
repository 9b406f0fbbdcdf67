"""Results files (``nnrelief report RUN --json``) and the tables/figures made from them."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnrelief.cli import build_parser, main
from nnrelief.experiments.config import ConfigError, ExperimentConfig, reproduce_command, resolve_config
from nnrelief.experiments.history import History
from nnrelief.reporting.results import (
    load_results,
    results_markdown,
    results_summary,
    results_tables,
    run_labels,
    run_results,
    update_marked_blocks,
    validate_results,
)
from nnrelief.reporting.seeds import Spread, seed_groups, seeds_markdown

SMALL = [
    "--preset", "demo", "--epochs", "1", "--retrain-epochs", "1", "--num-iters", "2",
    "--train-subset", "1000", "--val-size", "500", "--prune-samples", "300", "--device", "cpu",
    "--no-progress", "--threads", "1", "-q",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny demo run with a global-magnitude baseline over 2 iterations."""
    folder = tmp_path_factory.mktemp("runs") / "demo"
    threads = torch.get_num_threads()
    assert main(["compare", *SMALL, "--methods", "global-magnitude", "--run-dir", str(folder)]) == 0
    torch.set_num_threads(threads)
    return folder


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_json_of_a_run_follows_its_history(run, tmp_path, capsys):
    before = snapshot(run)
    out = tmp_path / "results" / "demo.json"
    assert main(["report", str(run), "--json", str(out), "--device-name", "cpu (test)", "-q"]) == 0
    assert f"results: {out}" in capsys.readouterr().out
    assert snapshot(run) == before, "reading a run must not write to it"
    assert not (run / "report").exists(), "--json alone draws no figures"
    data = json.loads(out.read_text())
    assert (data["model"], data["dataset"], data["device"]) == ("lenet300_100", "mnist-sample", "cpu (test)")
    assert data["settings"] == json.loads((run / "config.json").read_text())
    history = History.from_dict(json.loads((run / "history.json").read_text()))
    assert [row["iteration"] for row in data["iterations"]] == [0, 1, 2]
    assert data["iterations"][0]["remaining_percent"] == 100.0
    for row, record in zip(data["iterations"], history.records):
        assert row["test_accuracy"] == record.accuracy_after["test"]
        assert row["val_accuracy"] == record.accuracy_after["val"]
        assert row["macs"] == record.macs_sparse
        assert row["remaining_percent"] == pytest.approx(record.remaining_percent)
    parts = data["wall_time_parts_s"]
    assert list(parts) == ["dense", "nnrelief", "global-magnitude"]
    assert parts["nnrelief"] == pytest.approx(sum(record.seconds for record in history.records))
    assert parts["global-magnitude"] > 0 and data["wall_time_s"] == pytest.approx(sum(parts.values()))
    baselines = data["baselines"]
    assert [(b["method"], b["iteration"]) for b in baselines] == [("global-magnitude", 1), ("global-magnitude", 2)]
    for baseline, row in zip(baselines, data["iterations"][1:]):
        assert baseline["remaining_percent"] == pytest.approx(row["remaining_percent"])  # matched compression
        assert 0 < baseline["macs"] <= data["iterations"][0]["macs"]
        assert 0.0 <= baseline["test_accuracy"] <= 1.0


def test_rebuilt_command_reproduces_the_settings(run):
    cfg = ExperimentConfig.from_dict(json.loads((run / "config.json").read_text()))
    command = reproduce_command(cfg, data_dir="/data")
    words = shlex.split(command)
    assert words[:2] == ["nnrelief", "prune"] and "--preset" not in words
    args = build_parser().parse_args(words[1:])
    names = [f.name for f in dataclasses.fields(ExperimentConfig)]
    rebuilt, _ = resolve_config(None, None, {n: getattr(args, n) for n in names if hasattr(args, n)})
    assert rebuilt.config_hash() == cfg.config_hash()
    assert rebuilt.data_dir == "/data"
    assert run_results(run, command="my exact command")["command"] == "my exact command"


def test_validation_names_the_wrong_entry(run):
    data = run_results(run)
    percent = copy.deepcopy(data)
    percent["iterations"][1]["test_accuracy"] = 97.5  # a percentage where a fraction belongs
    with pytest.raises(ConfigError, match=r"x.json: iterations\[1\]: accuracy must be a fraction"):
        validate_results(percent, "x.json")
    missing = copy.deepcopy(data)
    del missing["baselines"][0]["method"]
    with pytest.raises(ConfigError, match=r"baselines\[0\]: missing key\(s\) \['method'\]"):
        validate_results(missing)
    no_dense = copy.deepcopy(data)
    no_dense["iterations"] = no_dense["iterations"][1:]
    with pytest.raises(ConfigError, match="iteration 0"):
        validate_results(no_dense)
    with pytest.raises(ConfigError, match="missing key"):
        validate_results({"model": "x"})


def test_json_needs_exactly_one_finished_run(run, tmp_path, capsys):
    assert main(["report", str(run), str(run), "--json", str(tmp_path / "x.json"), "-q"]) == 1
    assert "--json takes one run folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--json", str(tmp_path / "x.json"), "-q"]) == 1
    assert "not a finished run folder" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_dense_time_travels_with_the_folder_and_is_left_out_where_unrecorded(run, tmp_path):
    copied = tmp_path / "copied"
    shutil.copytree(run, copied, copy_function=shutil.copyfile)  # new file times, as a git checkout gives
    os.utime(copied / "trained.pt", (0, 0))
    parts = run_results(copied)["wall_time_parts_s"]
    written = {e: json.loads((run / "checksums.json").read_text())["files"][e]["written"] for e in ("init.pt", "trained.pt")}
    assert parts["dense"] == pytest.approx(written["trained.pt"] - written["init.pt"]) and parts["dense"] >= 0
    (copied / "checksums.json").unlink()  # a folder written before checksums recorded times
    data = run_results(copied)
    assert list(data["wall_time_parts_s"]) == ["nnrelief", "global-magnitude"]
    assert data["wall_time_s"] == pytest.approx(sum(data["wall_time_parts_s"].values()))
    assert "dense" not in results_markdown(data).splitlines()[0]


def test_results_command_writes_table_and_figure(run, tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert main(["report", str(run), "--json", str(path), "-q"]) == 0
    out = tmp_path / "page"
    assert main(["results", str(path), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    for figure in ("results.png", "results-macs.png"):
        assert f"figure: {out / figure}" in printed
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert table == results_markdown(load_results(path))
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "1", "2"]
    assert "global-magnitude" in rows[1] and "global-magnitude" not in rows[0]
    path.write_text("{not json")
    assert main(["results", str(path), "-o", str(out), "-q"]) == 1
    assert "is not valid JSON" in capsys.readouterr().err


def handmade(accuracies: list[float], remaining: list[float], num_iters: int | None = None) -> dict:
    """A results dict with the given test accuracies (fractions) and remaining percentages."""
    rows = [
        {"iteration": i, "remaining_percent": r, "test_accuracy": a, "val_accuracy": a, "macs": 1000 * (i + 1)}
        for i, (a, r) in enumerate(zip(accuracies, remaining))
    ]
    settings = {"num_iters": len(rows) - 1 if num_iters is None else num_iters}
    return {"model": "m", "dataset": "d", "device": "cpu", "command": "c", "settings": settings,
            "wall_time_s": 600.0, "iterations": rows, "baselines": []}  # fmt: skip


def test_summary_finds_the_fewest_weights_within_a_point_of_dense():
    # dense 90.00%: 90.50, 89.20 and 89.05 are within one point, 88.99 (at the fewest weights) is not
    data = handmade([0.90, 0.905, 0.892, 0.8905, 0.8899], [100.0, 60.0, 40.0, 30.0, 20.0])
    assert "iteration 3, 30.00% of the weights at 89.05%" in results_summary(data)
    data["baselines"] = [{"method": "global-magnitude", "iteration": 3, "remaining_percent": 30.0, "test_accuracy": 0.85}]
    assert results_summary(data).endswith("at the same iteration global-magnitude 85.00% (30.00%).")
    data["baselines"].append({"method": "l1-filter", "iteration": 3, "remaining_percent": 41.5, "test_accuracy": 0.8, "macs": 4000})
    assert results_summary(data).endswith(
        "at the same iteration global-magnitude 85.00% (30.00%), l1-filter 80.00% (41.50%, 4.0K MACs).")
    assert "iteration 1," in results_summary(data, within_points=0.0)
    assert "No iteration is within 0.5 point" in results_summary(handmade([0.9, 0.8], [100.0, 50.0]), 0.5)


def test_table_scales_macs_and_says_when_the_run_is_unfinished():
    data = handmade([0.9, 0.9, 0.9], [100.0, 50.0, 25.0], num_iters=5)
    data["iterations"][0]["macs"] = 40_551_424
    data["iterations"][1]["macs"] = 1_234
    data["iterations"][2]["macs"] = 999
    table = results_markdown(data)
    assert "wall time 10 min, 2 of 5 iterations done)" in table.splitlines()[0]
    cells = [line.split("|")[8].strip() for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert cells == ["40.6M", "1.2K", "999"]
    assert "iterations done" not in results_markdown(handmade([0.9, 0.9], [100.0, 50.0]))


def test_marked_blocks_are_replaced_and_the_rest_kept():
    text = "intro\n<!-- results: a -->\nold a\n<!-- /results: a -->\nmiddle\n<!-- results: b -->\n<!-- /results: b -->\nend\n"
    new = update_marked_blocks(text, {"a": "table a\n", "b": "table b"})
    assert new == ("intro\n<!-- results: a -->\ntable a\n<!-- /results: a -->\nmiddle\n"
                   "<!-- results: b -->\ntable b\n<!-- /results: b -->\nend\n")  # fmt: skip
    assert update_marked_blocks(new, {"a": "table a\n", "b": "table b"}) == new
    with pytest.raises(ConfigError, match=r"doc.md: needs exactly one pair of lines '<!-- results: c -->'"):
        update_marked_blocks(text, {"c": "x"}, "doc.md")
    with pytest.raises(ConfigError, match="exactly one pair"):
        update_marked_blocks(text + text, {"a": "x"})
    with pytest.raises(ConfigError, match="exactly one pair"):
        update_marked_blocks("<!-- /results: a -->\n<!-- results: a -->\n", {"a": "x"})


def test_results_into_a_document(run, tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert main(["report", str(run), "--json", str(path), "-q"]) == 0
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n<!-- results: other -->\nkept\n<!-- /results: other -->\n")
    out = tmp_path / "page"
    assert main(["results", str(path), "-o", str(out), "--into", str(doc), "-q"]) == 1
    assert "'<!-- results: demo -->'" in capsys.readouterr().err
    assert not out.exists(), "nothing is written when the document lacks the markers"
    doc.write_text(doc.read_text() + "text\n<!-- results: demo -->\n<!-- /results: demo -->\nafter\n")
    assert main(["results", str(path), "-o", str(out), "--into", str(doc), "-q"]) == 0
    assert f"updated: {doc}" in capsys.readouterr().out
    text = doc.read_text()
    assert update_marked_blocks(text, {"demo": results_markdown(load_results(path))}) == text
    assert "kept\n" in text and text.endswith("after\n")
    mtime = doc.stat().st_mtime_ns
    assert main(["results", str(path), "-o", str(out), "--into", str(doc), "-q"]) == 0
    assert "updated" not in capsys.readouterr().out and doc.stat().st_mtime_ns == mtime


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(handmade([0.9] * 40, [100.0 / (i + 1) for i in range(40)])))
    process = subprocess.Popen(
        [sys.executable, "-m", "nnrelief", "results", str(path), "-o", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    process.stdout.close()  # like `| head` that has read enough
    error = process.stderr.read()
    assert process.wait() == 141 and error == ""
    assert (tmp_path / "out" / "results.png").is_file(), "the files are written before anything is printed"


def test_percent_axis_reads_plain_numbers():
    from nnrelief.reporting.figures import percent_axis, pyplot

    plt = pyplot()
    fig, axis = plt.subplots()
    axis.plot([100.0, 2.0], [1.0, 2.0])
    axis.set_xscale("log")
    percent_axis(axis.xaxis, [100.0, 2.0])
    fig.canvas.draw()
    labels = [label.get_text() for label in axis.get_xticklabels() if label.get_text()]
    plt.close(fig)
    assert {"100%", "50%", "10%", "5%", "2%"} <= set(labels), labels
    assert not any("10^" in label or "times" in label for label in labels), labels


def seeded(seed: int, accuracies: list[float], remaining: list[float], baseline: list[float], lr: float = 1e-3) -> dict:
    """A handmade results file of seed ``seed`` with a global-magnitude baseline at NNrelief's remaining weights."""
    data = handmade(accuracies, remaining)
    data["settings"].update(seed=seed, lr=lr, device=f"cuda:{seed}", data_dir=f"/data{seed}")
    data["command"] = f"nnrelief prune --seed {seed}"
    data["baselines"] = [
        {"method": "global-magnitude", "iteration": k, "remaining_percent": remaining[k], "test_accuracy": a, "macs": 500 * k}
        for k, a in enumerate(baseline, start=1)
    ]  # fmt: skip
    return data


def test_spread_by_hand():
    spread = Spread.of([0.97, 0.98, 0.99])
    assert (spread.mean, spread.low, spread.high, spread.n) == (pytest.approx(0.98), 0.97, 0.99, 3)
    assert spread.std == pytest.approx(0.01)  # sample standard deviation: sqrt((1e-4 + 0 + 1e-4) / 2)
    assert spread.text(100) == "98.00 ± 1.00 [97.00, 99.00]"
    assert Spread.of([0.5]).text(100) == "50.00" and Spread.of([0.5]).std == 0.0
    with pytest.raises(ValueError):
        Spread.of([])


def test_runs_that_differ_only_by_seed_are_grouped():
    named = {
        "s0": seeded(0, [0.9, 0.8], [100.0, 50.0], [0.7]),
        "other": seeded(0, [0.9, 0.8], [100.0, 50.0], [0.7], lr=0.1),
        "s1": seeded(1, [0.9, 0.8], [100.0, 50.0], [0.7]),
    }
    named["s1"]["settings"]["num_iters"] = 7  # planned iterations, device and data folder do not make a run differ
    groups = seed_groups(named)
    assert list(groups) == ["s0+s1", "other"]
    assert groups["s0+s1"] == [named["s0"], named["s1"]] and groups["other"] == [named["other"]]
    tables = results_tables(groups)
    assert tables["other"] == results_markdown(named["other"]), "a single file keeps its table"


def test_seed_table_by_hand():
    group = [
        seeded(0, [0.90, 0.80, 0.70], [100.0, 50.0, 25.0], [0.78, 0.60]),
        seeded(1, [0.92, 0.84, 0.74], [100.0, 52.0, 27.0], [0.80, 0.64]),
        seeded(2, [0.94, 0.82], [100.0, 48.0], [0.82]),  # one iteration fewer
    ]
    table = seeds_markdown(group)
    lines = table.splitlines()
    assert lines[0].startswith("**m on d**, seeds 0, 1, 2 (cpu, wall time 30 min in all)")
    assert lines[2] == ("| iter | n | NNrelief remaining (%) | NNrelief test (%) | global-magnitude remaining (%) "
                        "| global-magnitude test (%) |")  # fmt: skip
    assert lines[4] == "| 0 | 3 | 100.00 ± 0.00 [100.00, 100.00] | 92.00 ± 2.00 [90.00, 94.00] | - | - |"
    assert lines[5] == ("| 1 | 3 | 50.00 ± 2.00 [48.00, 52.00] | 82.00 ± 2.00 [80.00, 84.00] "
                        "| 50.00 ± 2.00 [48.00, 52.00] | 80.00 ± 2.00 [78.00, 82.00] |")  # fmt: skip
    assert lines[6] == ("| 2 | 2 | 26.00 ± 1.41 [25.00, 27.00] | 72.00 ± 2.83 [70.00, 74.00] "
                        "| 26.00 ± 1.41 [25.00, 27.00] | 62.00 ± 2.83 [60.00, 64.00] |")  # fmt: skip
    group[2]["baselines"] = []  # a baseline run on two seeds only
    assert seeds_markdown(group).splitlines()[5].endswith("| 79.00 ± 1.41 [78.00, 80.00] (n=2) |")


def test_results_command_groups_seeds(tmp_path, capsys):
    files = []
    for seed, shift in ((0, 0.0), (1, 0.02), (2, 0.01)):
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps(seeded(seed, [0.9 + shift, 0.8 + shift], [100.0, 50.0], [0.7 + shift])))
        files.append(str(path))
    single = tmp_path / "single.json"
    single.write_text(json.dumps(seeded(0, [0.9, 0.8], [100.0, 50.0], [0.7], lr=0.1)))
    doc = tmp_path / "RESULTS.md"
    doc.write_text("<!-- results: s0+s1+s2 -->\n<!-- /results: s0+s1+s2 -->\n<!-- results: single -->\n<!-- /results: single -->\n")
    out = tmp_path / "page"
    assert main(["results", *files, str(single), "-o", str(out), "--into", str(doc), "-q"]) == 0
    printed = capsys.readouterr().out
    for figure in ("results.png", "results-macs.png"):
        assert f"figure: {out / figure}" in printed
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = seed_groups({Path(f).stem: load_results(f) for f in [*files, single]})
    assert (out / "results.md").read_text() == "\n".join(results_tables(groups).values())
    assert "| 1 | 3 | 50.00 ± 0.00 [50.00, 50.00] | 81.00 ± 1.00 [80.00, 82.00] |" in doc.read_text()
    assert results_markdown(load_results(single)) in doc.read_text()


def test_runs_of_the_same_model_are_labelled_by_what_differs():
    quick, slow = seeded(0, [0.9, 0.8], [100.0, 50.0], [0.7]), seeded(0, [0.9, 0.8], [100.0, 50.0], [0.7], lr=0.1)
    other = copy.deepcopy(quick)
    other["model"] = "lenet5"
    twin = copy.deepcopy(quick)
    twin["settings"]["device"] = "cpu"  # where a run ran does not tell it apart: its name does
    groups = {"quick": [quick], "slow": [slow, seeded(1, [0.9, 0.8], [100.0, 50.0], [0.7], lr=0.1)], "other": [other]}
    labels = run_labels(groups)
    model = f"{quick['model']} / {quick['dataset']}"
    assert labels == {"quick": f"{model} (lr 0.001)", "slow": f"{model} (lr 0.1), 2 seeds", "other": f"lenet5 / {quick['dataset']}"}
    assert run_labels({"a": [quick], "b": [twin]}) == {"a": f"{model} (a)", "b": f"{model} (b)"}
