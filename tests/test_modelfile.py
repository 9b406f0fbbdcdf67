"""Model files a user has: state dicts, compacted TorchScript and .pt2 programs and whole
modules, told apart by content, evaluated and reported by ``eval`` and ``report``."""

from __future__ import annotations

import re
import zipfile

import pytest
import torch

import nnrelief
from nnrelief.cli import main
from nnrelief.compaction import compact
from nnrelief.compaction.export import export_program, export_torchscript
from nnrelief.compaction.opmetrics import op_summary
from nnrelief.metrics import summarize
from nnrelief.modelfile import PROGRAM, TORCHSCRIPT, file_format, load_model_file
from nnrelief.models import lenet5
from nnrelief.pruning.masks import make_permanent

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One pruned LeNet-5 in every format; the program is saved as .pt, the TorchScript as .pt2."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = lenet5()
    nnrelief.prune(model, [torch.rand(64, *SHAPE)], alpha_fc=0.7, alpha_conv=0.7, progress=False)
    model.eval()
    example = torch.rand(2, *SHAPE)
    smaller = compact(model, example)
    paths = {"state": folder / "state.pt", "script": folder / "script.pt2", "program": folder / "program.pt",
             "module": folder / "module.pt"}  # fmt: skip
    torch.save(model.state_dict(), paths["state"])
    export_torchscript(smaller, example, paths["script"])
    export_program(smaller, example, paths["program"])
    torch.save(make_permanent(compact(model, example)), paths["module"])
    return model, smaller, paths


def test_formats_are_told_apart_by_content_not_extension(files):
    _, _, paths = files
    assert file_format(paths["script"]) == TORCHSCRIPT and file_format(paths["program"]) == PROGRAM
    assert file_format(paths["state"]) == file_format(paths["module"]) == "pickle"
    kinds = {name: load_model_file(path, "lenet5", "mnist-sample", trust=name == "module").kind
             for name, path in paths.items() if name != "state"}  # fmt: skip
    assert kinds == {"script": "TorchScript", "program": "ExportedProgram", "module": "whole module"}
    assert load_model_file(paths["state"], "lenet5", "mnist-sample").kind == "state dict"


def test_operation_counts_of_a_torchscript_file_match_the_module_counts(files):
    model, smaller, paths = files
    scripted = load_model_file(paths["script"], dataset="mnist-sample").model
    counted, expected = op_summary(scripted, SHAPE), summarize(smaller, SHAPE)
    assert counted.to_dict() == expected.to_dict()
    assert counted.macs_sparse == summarize(model, SHAPE).macs_sparse < counted.macs_dense


def _eval(path, capsys, *extra):
    assert main(["eval", str(path), "--dataset", "mnist-sample", "--device", "cpu", "-q", *extra]) == 0
    out = capsys.readouterr().out
    accuracy = re.search(r"accuracy: (\S+)%", out).group(1)
    macs = re.search(r"MACs per sample: ([\d,]+) counting unpruned weights", out).group(1)
    params = re.search(r"parameters \(Linear/conv\): ([\d,]+) /", out).group(1)
    return out, (accuracy, macs, params)


def test_eval_reads_every_format_with_the_same_accuracy_parameters_and_macs(files, capsys):
    model, _, paths = files
    out, expected = _eval(paths["state"], capsys, "--model", "lenet5")
    assert "(state dict)" in out
    summary = summarize(model, SHAPE)
    assert expected[1:] == (f"{summary.macs_sparse:,}", f"{summary.params_nonzero:,}")
    for name, kind in (("script", "TorchScript"), ("program", "ExportedProgram"), ("module", "whole module")):
        out, found = _eval(paths[name], capsys, *(["--trust-file"] if name == "module" else []))
        assert f"({kind})" in out and "conv1" in out and "fc2" in out
        assert found == expected, name


def test_report_of_model_files_has_their_accuracy_and_macs(files, tmp_path, capsys):
    _, _, paths = files
    _, (accuracy, macs, _) = _eval(paths["program"], capsys)
    argv = ["report", str(paths["script"]), str(paths["program"]), "--dataset", "mnist-sample", "-o", str(tmp_path), "-q"]
    assert main(argv) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## script.pt2" in text and "## program.pt" in text and "TorchScript" in text and "ExportedProgram" in text
    assert text.count(f"accuracy {accuracy}%") == 2 and text.count(f"{macs} MACs per sample") == 2
    assert "| conv1 | conv |" in text


def test_a_state_dict_of_another_model_is_told_in_a_few_lines(files, capsys):
    _, _, paths = files
    assert main(["eval", str(paths["state"]), "--model", "lenet300_100", "--dataset", "mnist-sample", "-q"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 4 and all(len(line) < 300 for line in lines), lines
    assert "does not fit model lenet300_100" in lines[0] and "keys of other shapes" in lines[0] and "keys missing" in lines[0]
    assert "fc1.weight: checkpoint (500, 800), model (300, 784)" in lines[1]
    assert any(line.strip().startswith("not in the model: conv1.weight") and "more)" in line for line in lines)


def test_files_that_hold_no_model_are_refused_unchanged(tmp_path, capsys):
    junk, archive, tensors = tmp_path / "junk.pt", tmp_path / "other.pt", tmp_path / "list.pt"
    junk.write_bytes(b"not a model at all")
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("other/readme.txt", "hello")
    torch.save([torch.zeros(2)], tensors)
    for path, needle in ((junk, "is not a model file (18 bytes"), (archive, "zip archive without a model"), (tensors, "holds a list, not a model")):
        before = path.read_bytes()
        assert main(["eval", str(path), "--dataset", "mnist-sample", "-q"]) == 1
        err = capsys.readouterr().err
        assert needle in err and "give a state dict, a TorchScript file" in err and len(err.splitlines()) == 1
        assert path.read_bytes() == before


def test_eval_v_says_once_how_the_file_was_analysed(files, capsys):
    _, _, paths = files
    assert main(["eval", str(paths["program"]), "--dataset", "mnist-sample", "--device", "cpu", "-v"]) == 0
    err = capsys.readouterr().err
    assert err.count("ExportedProgram file analysed from the operations of one forward pass") == 1
