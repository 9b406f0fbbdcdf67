"""Faults around the user's own files: outputs that would replace a run's files or the
input, writes killed before their rename, files crafted to run code when unpickled, and
model files of every wrong kind given to ``eval``, ``report`` and ``compact``.

Part of the fault suite (README's reliability section counts these cases; ``-s`` prints
them). The tiny run of ``test_faults`` is made once here.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import nnrelief
from nnrelief import fileio
from nnrelief.cli import main
from nnrelief.compaction import compact
from nnrelief.compaction.export import SPARSE_FORMAT, export_program, export_torchscript, load_sparse, save_sparse
from nnrelief.experiments.experiment import load_weights, run_data_dir, stored_data_dir
from nnrelief.models import get_model
from nnrelief.reporting.figures import pyplot, save
from test_faults import HOLD, REAL_REPLACE, TINY, Killed, error_line, killing_at

EXAMPLE = torch.rand(2, 1, 28, 28)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A finished tiny run (LeNet-300-100, MNIST sample, 2 iterations)."""
    run_dir = tmp_path_factory.mktemp("user-files") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["prune", *TINY, "--run-dir", str(run_dir)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir


@pytest.fixture
def run(source, tmp_path) -> Path:
    """A copy of the tiny run, to be damaged at will."""
    shutil.copytree(source, tmp_path / "run")
    return tmp_path / "run"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def compacted(run: Path) -> nn.Module:
    return compact(load_weights(run / "model-iter2.pt")[0], EXAMPLE)


# ----------------------------------------------------------------------------- outputs


def test_no_output_replaces_the_input_or_a_file_of_the_run(run, capsys):
    checkpoint = str(run / "model-iter2.pt")
    cases = [
        ["-o", str(run / "model-iter1.pt")],  # the run's earlier iteration (issue: overwritten, exit 0)
        ["-o", checkpoint],  # the input itself
        ["-o", str(run / "model-iter7.pt")],  # a name the run would write next
        ["-o", str(run / "small.pt"), "--onnx", str(run / "relief_state.pt")],
        ["-o", str(run / "small.pt"), "--sparse", str(run / "history.json")],
        ["-o", str(run / "small.pt"), "--sparse", str(run / "small.pt")],  # two outputs, one file
    ]
    before = snapshot(run)
    failures = []
    for case in cases:
        code = main(["compact", checkpoint, *case, "-q"])
        line = error_line(capsys)
        if code != 1 or snapshot(run) != before or not any(word in line for word in ("never", "both name")):
            failures.append((case, line))
    assert main(["report", str(run), "--json", str(run / "history.json"), "-q"]) == 1
    assert "never replaces" in error_line(capsys) and snapshot(run) == before
    print(f"\noutputs: {len(cases) + 1} that would replace the input or a run's file, {len(cases) + 1 - len(failures)} refused")
    assert not failures
    assert main(["compact", checkpoint, "-o", str(run / "small.pt"), "-q"]) == 0  # beside the run's files: allowed
    assert set(snapshot(run)) == {*before, "small.pt"}


def test_a_killed_write_keeps_the_old_file_and_its_leftover_goes_with_the_next_write(run, tmp_path, monkeypatch):
    out = tmp_path / "out" / "small.pt"
    argv = ["compact", str(run / "model-iter2.pt"), "-o", str(out), "-q"]
    assert main(argv) == 0
    first = out.read_bytes()
    monkeypatch.setattr(os, "replace", killing_at(1, []))
    with pytest.raises(Killed):
        main(["compact", str(run / "model-iter1.pt"), "-o", str(out), "-q"])
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    assert out.read_bytes() == first and [p.name for p in out.parent.glob(".small.*")] == [".small.killed.tmp.pt"]
    live = out.parent / ".small.abcd1234.tmp.pt"  # another write of the same name, under way
    others = [out.parent / ".small.abcd1234.tmp.onnx", out.parent / ".notes.abcd1234.tmp.pt", out.parent / ".small.tmp.pt"]
    for path in [live, *others]:
        path.write_bytes(b"not ours to remove")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(argv) == 0
    assert not (out.parent / ".small.killed.tmp.pt").exists() and live.exists() and all(p.exists() for p in others)


def test_a_figure_killed_while_written_keeps_the_previous_one(tmp_path, monkeypatch):
    plt = pyplot()
    path = tmp_path / "accuracy.png"
    save(plt.figure(), path)
    previous = path.read_bytes()
    figure = plt.figure()
    figure.gca().plot([1, 2, 3])
    monkeypatch.setattr(os, "replace", killing_at(1, []))
    with pytest.raises(Killed):
        save(figure, path)
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    assert path.read_bytes() == previous and (tmp_path / ".accuracy.killed.tmp.png").exists()
    save(figure, path)
    assert path.read_bytes() != previous and sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png"]


# ----------------------------------------------------------------------------- code in pickles


class Planted:
    """Unpickled, it creates ``marker`` (what a malicious file could do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_no_file_runs_code_unless_trusted(run, tmp_path, capsys):
    marker = tmp_path / "marker"
    state = torch.load(run / "model-iter2.pt", weights_only=True)
    files = {
        "object.pt": Planted(marker),
        "state.pt": {**state, "extra": Planted(marker)},  # one malicious entry in a real state dict
        "sparse.pt": {"format": SPARSE_FORMAT, "version": 1, "module": Planted(marker), "tensors": {}},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    failures = []
    for name in files:
        for argv in (["eval", str(tmp_path / name), "--model", "lenet300_100", "--dataset", "mnist-sample"],
                     ["report", str(tmp_path / name), "--dataset", "mnist-sample", "-o", str(tmp_path / "r")],
                     ["compact", str(tmp_path / name), "-o", str(tmp_path / "c.pt"), "--model", "lenet300_100",
                      "--dataset", "mnist-sample"]):  # fmt: skip
            code = main([*argv, "-q"])
            line = error_line(capsys)
            expected = "--trust-file" if argv[0] != "compact" else "not a state dict"
            if code != 1 or marker.exists() or expected not in line or str(tmp_path / name) not in line:
                failures.append((name, argv[0], line))
    with pytest.raises(ValueError, match="trust=True"):
        load_sparse(tmp_path / "sparse.pt")
    print(f"\ncode in pickles: {3 * len(files) + 1} loads, {3 * len(files) + 1 - len(failures)} refused without running it")
    assert not failures and not marker.exists()
    main(["eval", str(tmp_path / "object.pt"), "--dataset", "mnist-sample", "--trust-file", "-q"])
    assert marker.exists()  # the opt-in does unpickle: the files above would have run their code


def _format_1(model: nn.Module, path: Path) -> None:
    """A sparse file as nnrelief wrote it before format 2: the module pickled, tensors apart."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    memo = {id(t): nn.Parameter(t.new_empty(0)) if isinstance(t, nn.Parameter) else t.new_empty(0) for t in tensors.values()}
    payload = {"format": SPARSE_FORMAT, "version": 1, "module": copy.deepcopy(model, memo),
               "tensors": {name: {"kind": "dense", "data": t.detach().clone()} for name, t in tensors.items()}}  # fmt: skip
    torch.save(payload, path)


def test_sparse_files_load_with_weights_only_and_old_ones_with_trust(run, tmp_path, capsys):
    smaller = compacted(run).eval()
    expected = smaller(EXAMPLE)
    new, old, module = tmp_path / "new.sparse", tmp_path / "old.sparse", tmp_path / "module.pt"
    save_sparse(smaller, new)
    assert torch.load(new, weights_only=True)["format"] == SPARSE_FORMAT
    _format_1(smaller, old)
    torch.save(smaller, module)
    blank = copy.deepcopy(smaller)
    with torch.no_grad():
        for tensor in blank.parameters():
            tensor.zero_()
    assert torch.allclose(load_sparse(new, blank)(EXAMPLE), expected)
    assert torch.allclose(load_sparse(old, trust=True).eval()(EXAMPLE), expected)
    with pytest.raises(ValueError, match="without its architecture: give the model"):
        load_sparse(new)
    accuracies = []
    for path in (old, module):
        assert main(["eval", str(path), "--dataset", "mnist-sample", "-q"]) == 1
        assert "--trust-file" in error_line(capsys)
        assert main(["eval", str(path), "--dataset", "mnist-sample", "--trust-file", "-q"]) == 0
        accuracies.append(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accuracy")))
    assert accuracies[0] == accuracies[1]


# ----------------------------------------------------------------------------- files of the wrong kind


def _wrong_files(run: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the one-line error must say)."""
    text, tiny, strings, listed, sparse, cut = (folder / n for n in ("a.txt", "b.pt", "c.pt", "d.pt", "e.sparse", "f.pt"))
    text.write_text("weights: none\n")
    tiny.write_bytes(b"\x80\x02.")
    torch.save({"fc1.weight": "str"}, strings)
    torch.save([torch.zeros(2)], listed)
    torch.save({"format": SPARSE_FORMAT, "version": 2}, sparse)
    data = (run / "model-iter1.pt").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    onnx = folder / "g.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch")  # what an ONNX file starts with
    return {
        "text file": (text, "is not a model file (14 bytes"),
        "3-byte file": (tiny, "cannot be read"),
        "string value": (strings, "entry 'fc1.weight' is a str, not a tensor"),
        "pickled list": (listed, "holds a list"),
        "malformed sparse": (sparse, "damaged sparse file"),
        "truncated": (cut, "is damaged: a zip archive"),
        "ONNX": (onnx, "ONNX"),
    }


def test_each_wrong_model_file_is_named_in_one_line(run, tmp_path, capsys):
    failures, cases = [], 0
    for name, (path, needle) in _wrong_files(run, tmp_path).items():
        before = path.read_bytes()
        for argv in (["eval", str(path), "--model", "lenet300_100", "--dataset", "mnist-sample"],
                     ["compact", str(path), "-o", str(tmp_path / "out.pt"), "--model", "lenet300_100",
                      "--dataset", "mnist-sample"]):  # fmt: skip
            cases += 1
            code = main([*argv, "-q"])
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            named = len(lines) == 1 and str(path) in lines[0] and (needle in lines[0] or argv[0] == "compact")
            if code != 1 or not named or "Traceback" in err or path.read_bytes() != before:
                failures.append((name, argv[0], err[-300:]))
    print(f"\nwrong model files: {cases} cases, {cases - len(failures)} named in one line")
    assert not failures and not (tmp_path / "out.pt").exists()


def test_what_compact_writes_into_a_run_folder_is_evaluated_or_named_there(run, capsys):
    smaller = compacted(run)
    export_torchscript(smaller, EXAMPLE, run / "small.pt")
    export_program(smaller, EXAMPLE, run / "small.pt2")
    save_sparse(smaller, run / "small.sparse")
    accuracies = set()
    for name in ("small.pt", "small.pt2"):
        assert main(["eval", str(run / name), "-q"]) == 0, capsys.readouterr().err
        accuracies.add(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accuracy")))
    assert main(["eval", str(run / "model-iter2.pt"), "-q"]) == 0
    assert accuracies == {next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accuracy"))}
    assert main(["eval", str(run / "small.sparse"), "-q"]) == 1
    line = error_line(capsys)
    assert "sparse file" in line and "TorchScript (.pt) or .pt2" in line and "damaged" not in line
    torch.save(nnrelief.state_dict(smaller), run / "small.state.pt")
    for name, kind in (("small.pt", "TorchScript"), ("small.pt2", "ExportedProgram"), ("small.sparse", "sparse"),
                       ("small.state.pt", "nnrelief.state_dict")):  # fmt: skip
        assert main(["compact", str(run / name), "-o", str(run / "again.pt"), "-q"]) == 1
        line = error_line(capsys)
        assert kind in line and "compact takes a pruned state dict" in line and "damaged" not in line


def _accuracy(capsys) -> str:
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accuracy"))


def test_compact_state_dict_is_rebuilt_in_the_runs_class_by_eval_and_report(run, tmp_path, capsys):
    state_file = run / "small.state.pt"
    argv = ["compact", str(run / "model-iter2.pt"), "-o", str(run / "small.pt"), "--state-dict", str(state_file), "-q"]
    assert main(argv) == 0 and f"wrote {state_file}" in capsys.readouterr().out
    state = torch.load(state_file, weights_only=True)
    loaded = nnrelief.load_state_dict(get_model("lenet300_100", 10), state).eval()
    smaller = compacted(run)
    assert torch.equal(loaded(EXAMPLE), smaller(EXAMPLE)) and loaded.fc1.out_features == smaller.fc1.out_features < 300
    assert main(["eval", str(run / "small.pt"), "-q"]) == 0
    expected = _accuracy(capsys)
    assert main(["eval", str(state_file), "-q"]) == 0
    out = capsys.readouterr().out
    assert "(nnrelief.state_dict)" in out and f"{smaller.fc1.out_features}" in out
    assert next(line for line in out.splitlines() if line.startswith("accuracy")) == expected
    assert main(["report", str(state_file), "-o", str(tmp_path / "report"), "-q"]) == 0
    assert expected.split()[1] in (tmp_path / "report" / "report.md").read_text()
    outside = tmp_path / "small.state.pt"
    shutil.copy(state_file, outside)
    assert main(["eval", str(outside), "--dataset", "mnist-sample", "-q"]) == 1
    assert "nnrelief.state_dict of a LeNet300100, outside a run folder: give its architecture" in error_line(capsys)
    assert main(["eval", str(outside), "--model", "lenet5", "--dataset", "mnist-sample", "-q"]) == 1
    assert "does not fit model lenet5: the state is of class" in error_line(capsys)
    assert main(["eval", str(outside), "--model", "lenet300_100", "--dataset", "mnist-sample", "-q"]) == 0
    assert _accuracy(capsys) == expected


def test_compact_state_dict_of_an_index_map_graph_is_refused_before_any_write(run, tmp_path, capsys, monkeypatch):
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    monkeypatch.setattr("nnrelief.cli.compact", lambda model, example: traced)
    outputs = [tmp_path / "small.pt", tmp_path / "small.state.pt"]
    argv = ["compact", str(run / "model-iter2.pt"), "-o", str(outputs[0]), "--state-dict", str(outputs[1]), "-q"]
    assert main(argv) == 1
    assert "GraphModule, not your model's class" in error_line(capsys)
    assert not any(path.exists() for path in outputs)


def test_eval_names_the_onnx_file_compact_writes_and_what_to_use(run, tmp_path, capsys):
    pytest.importorskip("onnx")
    path = tmp_path / "small.onnx"
    assert main(["compact", str(run / "model-iter2.pt"), "-o", str(path), "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(path), "--dataset", "mnist-sample", "-q"]) == 1
    line = error_line(capsys)
    assert "is an ONNX model, which nnrelief does not run" in line and "--state-dict" in line and "onnxruntime" in line


# ----------------------------------------------------------------------------- the shared dense folder


@pytest.fixture
def runs(source, tmp_path) -> Path:
    """A copy of the tiny run's parent: the run and its shared dense folder."""
    shutil.copytree(source.parent, tmp_path / "runs")
    return tmp_path / "runs"


def _another_run(runs: Path, *extra: str) -> int:
    """A run beside the tiny one that needs the shared dense model (other pruning settings)."""
    return main(["prune", *TINY, "--alpha-fc", "0.9", "--run-dir", str(runs / "other"), *extra])


def test_a_damaged_shared_checksums_file_goes_with_the_remedy_it_names(runs, capsys):
    (shared,) = (runs / "dense").iterdir()
    (shared / "checksums.json").write_text("{")
    assert _another_run(runs) == 1
    line = error_line(capsys)
    assert f"{shared / 'checksums.json'} is damaged" in line and "delete it" in line
    (shared / "checksums.json").unlink()  # as the message says
    assert _another_run(runs) == 0
    assert (runs / "other" / "trained.pt").read_bytes() == (runs / "run" / "trained.pt").read_bytes()


def test_a_damaged_shared_dense_json_is_rewritten(runs, capsys):
    (shared,) = (runs / "dense").iterdir()
    original = (shared / "dense.json").read_bytes()
    (shared / "dense.json").write_text('{"model": ')
    assert _another_run(runs, "-v") == 0
    assert f"{shared / 'dense.json'} is damaged" in capsys.readouterr().err
    assert (shared / "dense.json").read_bytes() == original
    assert (runs / "other" / "trained.pt").read_bytes() == (runs / "run" / "trained.pt").read_bytes()


def test_a_read_only_incomplete_shared_folder_is_refused_before_training(runs, monkeypatch, capsys):
    (shared,) = (runs / "dense").iterdir()
    (shared / "trained.pt").unlink()  # as a run killed during its dense training leaves it
    before = snapshot(shared)
    real_open = os.open

    def read_only(path, *args, **kwargs):  # the shared folder's lock file cannot be opened for writing
        if Path(path) == shared / ".lock":
            raise OSError(13, os.strerror(13), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert _another_run(runs) == 1
    line = error_line(capsys)
    assert f"{shared} is not writable, and its dense model is not trained yet" in line
    assert snapshot(shared) == before


def test_a_run_waiting_for_the_shared_dense_model_says_so_at_the_default_level(runs, capfd):
    (shared,) = (runs / "dense").iterdir()
    (shared / "trained.pt").unlink()  # being trained by the holder
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(shared)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        threading.Timer(3.0, holder.kill).start()  # the other run ends: the lock goes with it
        argv = [word for word in TINY if word != "-q"]
        assert main(["prune", *argv, "--alpha-fc", "0.9", "--run-dir", str(runs / "other")]) == 0
    finally:
        holder.kill()
        holder.wait()
    assert f"waiting for another run training the shared dense model {shared}" in capfd.readouterr().err


def test_a_folder_removed_during_a_write_is_named_with_a_remedy(tmp_path):
    folder = tmp_path / "out"

    def write(file):
        file.write(b"half")
        shutil.rmtree(folder)  # removed (or moved) by someone else meanwhile
        open(folder / "x", "rb")  # what the writer's next step meets

    with pytest.raises(fileio.WriteError, match=f"cannot write {folder / 'model.pt'}: its folder was removed or moved"):
        fileio.atomic_write(folder / "model.pt", write)


def test_a_run_folder_under_a_file_is_named_without_errno(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["prune", *TINY, "--run-dir", str(tmp_path / "file" / "run")]) == 1
    line = error_line(capsys)
    assert f"cannot write {tmp_path / 'file' / 'run'}: a folder on its path is a file" in line
    assert not line.split(": error: ")[1].startswith("[Errno") and (tmp_path / "file").read_text() == "mine"


# ----------------------------------------------------------------------------- the run's data folder


def test_a_run_finds_its_data_folder_from_anywhere_and_moved(shared_data_dir, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "data").symlink_to(shared_data_dir)
    monkeypatch.chdir(project)
    argv = [*TINY, "--dataset", "mnist", "--data-dir", "data", "--num-iters", "1"]
    assert main(["prune", *argv, "--run-dir", "runs/run"]) == 0
    assert json.loads((project / "runs" / "run" / "config.json").read_text())["data_dir"] == "../../data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", str(project / "runs" / "run" / "model-iter1.pt"), "-q"]) == 0
    accuracy = capsys.readouterr().out.splitlines()[2]
    moved = tmp_path / "moved"
    project.rename(moved)  # the run moved with its data
    assert main(["eval", str(moved / "runs" / "run" / "model-iter1.pt"), "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == accuracy
    (moved / "data").unlink()  # the data gone: the message says where it looked and what to give
    assert main(["eval", str(moved / "runs" / "run" / "model-iter1.pt"), "-q"]) == 1
    line = error_line(capsys)
    assert f"the data folder of run {moved / 'runs' / 'run'} ({moved / 'data'}, from its config.json)" in line
    assert "give --data-dir DIR" in line
    assert main(["eval", str(moved / "runs" / "run" / "model-iter1.pt"), "--data-dir", str(shared_data_dir), "-q"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == accuracy


def test_a_stored_data_folder_resolves_against_the_run_folder_then_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    assert stored_data_dir("data", "runs/a") == "../../data"
    assert run_data_dir("../../data", tmp_path / "runs" / "a") == str(tmp_path / "data")
    assert run_data_dir("data", "runs/a") == "data"  # a run from before: relative to where it ran
    assert run_data_dir(str(tmp_path / "x"), "runs/a") == str(tmp_path / "x") and run_data_dir(None, "runs/a") is None


def test_a_dataset_without_its_folder_names_the_flag(tmp_path, capsys):
    torch.save(get_model("lenet300_100", 10).state_dict(), tmp_path / "state.pt")
    assert main(["eval", str(tmp_path / "state.pt"), "--model", "lenet300_100", "--dataset", "mnist", "-q"]) == 1
    line = error_line(capsys)
    assert "give --data-dir DIR" in line and "load_dataset" not in line
