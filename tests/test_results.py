"""Results files (``nnrelief report RUN --json``) and the tables/figures made from them."""

from __future__ import annotations

import copy
import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import torch

from nnrelief.cli import build_parser, main
from nnrelief.experiments.config import ConfigError, ExperimentConfig, resolve_config
from nnrelief.experiments.history import History
from nnrelief.reporting.results import load_results, reproduce_command, results_markdown, run_results, validate_results

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
    assert data["wall_time_s"] >= sum(record.seconds for record in history.records) > 0
    baselines = data["baselines"]
    assert [(b["method"], b["iteration"]) for b in baselines] == [("global-magnitude", 1), ("global-magnitude", 2)]
    for baseline, row in zip(baselines, data["iterations"][1:]):
        assert baseline["remaining_percent"] == pytest.approx(row["remaining_percent"])  # matched compression
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


def test_results_command_writes_table_and_figure(run, tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert main(["report", str(run), "--json", str(path), "-q"]) == 0
    out = tmp_path / "page"
    assert main(["results", str(path), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"figure: {out / 'results.png'}" in printed
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert table == results_markdown(load_results(path))
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "1", "2"]
    assert "global-magnitude" in rows[1] and "global-magnitude" not in rows[0]
    path.write_text("{not json")
    assert main(["results", str(path), "-o", str(out), "-q"]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
