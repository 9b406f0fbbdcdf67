"""``nnrelief report`` and the figures of :mod:`nnrelief.reporting` on tiny demo runs."""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

import pytest
import torch

from nnrelief import prune
from nnrelief.cli import main
from nnrelief.experiments.experiment import load_weights
from nnrelief.models import get_model
from nnrelief.reporting import (
    MissingPlotDependencyError,
    connection_scores,
    load_run,
    plot_connections,
    write_report,
)
from nnrelief.reporting.connections import _segments, _select_nodes

SMALL = [
    "--preset", "demo", "--epochs", "1", "--retrain-epochs", "1", "--num-iters", "2",
    "--train-subset", "1000", "--val-size", "500", "--prune-samples", "300", "--device", "cpu",
    "--no-progress", "--threads", "1", "-q",
]  # fmt: skip


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk of a PNG file (asserting the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])



@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two tiny runs of the demo preset (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    folders = []
    for seed in (0, 1):
        assert main(["prune", *SMALL, "--seed", str(seed), "--run-dir", str(root / f"seed{seed}")]) == 0
        folders.append(root / f"seed{seed}")
    torch.set_num_threads(threads)
    return folders


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of ``text`` as rows of cells (separator rows dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(-+:?\|)+", line):
                current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_report_of_one_run(runs, capsys):
    run = runs[0]
    out = run / "report"
    assert main(["report", str(run), "--samples", "200", "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    for name in ("accuracy.png", "connections.png", "architecture.png"):
        width, height = png_size(out / name)
        assert 800 <= width <= 4000 and 400 <= height <= 3000, (name, width, height)
        assert f"figure: {out / name}" in printed
    text = (out / "report.md").read_text()
    for name in ("accuracy.png", "connections.png", "architecture.png"):
        assert f"]({name})" in text
    (table,) = markdown_tables(text)
    header, rows = table[0], table[1:]
    assert header[:5] == ["iter", "val before", "val after", "test before", "test after"]
    assert [row[0].split()[0] for row in rows] == ["0", "1", "2"]
    assert all(len(row) == len(header) for row in rows)
    history = load_run(run).history
    for row, record in zip(rows, history.records):
        assert float(row[4]) == pytest.approx(100 * record.accuracy_after["test"], abs=0.005)
        assert int(row[5].replace(",", "")) == record.params_remaining


def test_report_of_several_runs(runs, tmp_path, capsys):
    out = tmp_path / "both"
    assert main(["report", *map(str, runs), "-o", str(out), "--samples", "100", "--iteration", "1", "-q"]) == 0
    names = {path.name for path in out.glob("*.png")}
    assert names == {"accuracy.png"} | {f"{run.name}-{kind}.png" for run in runs for kind in ("connections", "architecture")}
    text = (out / "report.md").read_text()
    assert len(markdown_tables(text)) == 2
    # several runs need an output folder: a one-line error
    assert main(["report", *map(str, runs), "-q"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "-o OUT_DIR" in err[0]


def test_report_refuses_a_non_run_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-q"]) == 1
    err = capsys.readouterr().err
    assert "not a finished run folder" in err and "Traceback" not in err


def test_connection_scores_are_relative(runs):
    model, _ = load_weights(runs[0] / "model-iter2.pt")
    torch.manual_seed(0)
    inputs = torch.rand(64, 1, 28, 28)
    layers = connection_scores(model, inputs)
    assert [layer.name for layer in layers] == ["fc1", "fc2", "fc3"]
    for layer in layers:
        total = layer.scores.sum(1) + layer.bias_scores
        signal = total > 0
        assert torch.allclose(total[signal], torch.ones(int(signal.sum())), atol=1e-5)
        assert not bool(layer.scores[~layer.alive].any()), "pruned connections score 0"
        assert bool((layer.alive.any(1) <= layer.neuron_alive).all())


def test_connection_picture_of_a_conv_net(tmp_path):
    torch.manual_seed(0)
    model = get_model("lenet5", 10)
    inputs = torch.rand(48, 1, 28, 28)
    dense = connection_scores(model, inputs)
    prune(model, [inputs], alpha_fc=0.8, alpha_conv=0.8, progress=False)
    pruned = connection_scores(model, inputs)
    assert dense[2].scores.shape == (500, 800)
    caption = plot_connections(dense, pruned, tmp_path / "lenet5.png", input_shape=(1, 28, 28), max_nodes=8)
    assert "kernel" in caption and "pixel" not in caption
    width, height = png_size(tmp_path / "lenet5.png")
    assert width > 600 and height > 600


def test_missing_matplotlib_is_a_clear_error(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingPlotDependencyError, match=r"pip install 'nnrelief\[plots\]'"):
        write_report([runs[0]], tmp_path)


def test_drawn_neurons_lose_as_much_as_their_layer_and_removed_connections_are_drawn():
    torch.manual_seed(0)
    dense_alive = torch.ones(100, 40, dtype=torch.bool)
    final_alive = dense_alive.clone()
    final_alive[:60] = False  # 60 of the 100 neurons lose every incoming connection
    final_alive[:, :30] = False  # 30 of the 40 inputs lose every outgoing one
    scores = torch.rand(100, 40)
    dense, final = [(scores, dense_alive)], [(scores * final_alive, final_alive)]
    inputs, neurons = _select_nodes(dense, final, max_nodes=10)
    assert int(final_alive[:, inputs].any(0).sum()) in (2, 3) and int(final_alive[neurons].any(1).sum()) == 4
    ys = [[0.0] * 10, [0.0] * 10]
    kept, values, removed = _segments(final, dense, [inputs, neurons], ys)
    assert len(kept) == int(final_alive[neurons][:, inputs].sum()) and len(kept) + len(removed) == 100
    assert min(values) > 0
    assert _segments(dense, dense, [inputs, neurons], ys)[2] == []
