"""The ``nnrelief`` command: help, errors, a small run, eval, and resume after SIGKILL."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import nnrelief
from nnrelief.cli import build_parser, main
from nnrelief.compaction import compact
from nnrelief.compaction.export import load_sparse
from nnrelief.experiments.config import PRESETS, RECORDED_FIELDS, ExperimentConfig, reproduce_command, resolve_config
from nnrelief.experiments.experiment import load_weights
from nnrelief.pruning.masks import current_mask
from nnrelief.settings import specs

COMMANDS = ["train", "prune", "eval", "demo", "report", "compare", "compact"]
SMALL = [
    "--dataset", "mnist-sample", "--model", "lenet300_100", "--epochs", "1", "--retrain-epochs", "1",
    "--milestones", "--retrain-milestones", "--train-subset", "1000", "--val-size", "500",
    "--prune-samples", "300", "--num-iters", "2", "--device", "cpu", "--no-progress",
    "--threads", "1", "-q",
]  # fmt: skip
TIMES = {"prune_seconds", "retrain_seconds", "seconds"}



def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "error:" in lines[0]
    return lines[0]


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nnrelief")
    if argv[0] in ("prune", "train", "demo"):
        assert "--alpha-fc" in out and "--early-stop-margin" in out and "--preset" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"nnrelief {nnrelief.__version__}"


def test_every_setting_has_a_flag_with_its_declared_help():
    prune = build_parser().commands["prune"]
    helps = {a.dest: a.help for a in prune._actions if a.option_strings}
    for name, spec in specs(ExperimentConfig).items():
        assert spec.help
        assert (name in helps) == (name not in RECORDED_FIELDS)
        if name in helps:
            assert helps[name].startswith(spec.help.replace("%", "%%"))
            assert spec.range is None or f"in {spec.range}" in helps[name]


def test_help_shows_the_values_of_the_given_preset(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--preset", "resnet20-cifar10", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "values shown: preset resnet20-cifar10" in out
    assert "(preset: sgd)" in out and "(preset: 80 120)" in out and "(default: paper)" in out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(preset: {PRESETS['demo']['epochs']})" in out and "(default: 60)" not in out
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "(default: 60)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["prune", "--retrain-epoch", "1"], "unrecognized arguments: --retrain-epoch 1 (did you mean --retrain-epochs?)"),
        (["prune", "--retrain_epochs", "1"], "unrecognized arguments: --retrain_epochs 1 (did you mean --retrain-epochs?)"),
        (["prune", "--alpha_fc=0.9"], "(did you mean --alpha-fc?)"),
        (["eval", "x.pt", "--batch_size", "3"], "(did you mean --batch-size?)"),
        (["--verb", "prune"], "unrecognized arguments: --verb"),
    ],
)
def test_flags_are_never_abbreviated_and_unknown_ones_get_the_closest(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert needle in one_line_error(capsys.readouterr().err)


def test_recorded_fields_have_no_flag(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--world-size", "2"])
    assert "unrecognized arguments: --world-size" in capsys.readouterr().err


def test_unknown_preset_is_one_line(capsys, tmp_path):
    assert main(["prune", "--preset", "lenet-9000", "--runs-root", str(tmp_path)]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "unknown preset 'lenet-9000'" in line and "resnet20-cifar10" in line


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["prune", "--alpha-fcc", "0.9"], "unrecognized arguments: --alpha-fcc"),
        (["prune", "--epochs", "ten"], "invalid int value: 'ten'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_flags_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert needle in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["eval", "missing.pt"], "checkpoint missing.pt not found"),
        (["prune", "--config", "missing.toml"], "config file missing.toml not found"),
        (["train", "--dataset", "mnist", "--no-progress"], "dataset 'mnist' needs a data directory: give --data-dir DIR"),
        (["train", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", "nowhere", "--no-progress"], "not found"),
        (["train", "--alpha-fc", "1.5"], "setting alpha_fc must be in (0, 1], got 1.5 (flag --alpha-fc)"),
        (["train", "--optimizer", "sdg"], "got 'sdg' (did you mean sgd?) (flag --optimizer)"),
        (["train", "--amp", "fp8"], "amp must be one of ('off', 'bf16', 'fp16')"),
        (["train", "--model", "resnet20", "--dataset", "mnist-sample"], "expects inputs"),
        (["train", "--preset", "demo", "--retrain-milestones", "-1"], "setting retrain_milestones entries must be in [1, inf), got [-1]"),
        (["train", "--preset", "demo", "--retrain-epochs", "0"], "setting retrain_epochs must be in [1, inf)"),
        (["prune", "--config", "."], "config file . is a folder; give a TOML file"),
        (["prune", "--config", "binary.toml"], "config file binary.toml is not a text file (not UTF-8)"),
        (["eval", "."], ". is a folder; give a weights file, e.g. model-iter<k>.pt"),
    ],
)
def test_user_errors_are_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary.toml").write_bytes(b"\x7fELF\x02\x01\xd0\xff")
    assert main(argv) == 1
    assert needle in one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.toml"]  # nothing created


@pytest.mark.parametrize("key", ["retrain-epochs", "retrain_epoch", "Retrain_Epochs"])
def test_unknown_toml_keys_get_the_closest_setting(key, capsys, tmp_path):
    (tmp_path / "exp.toml").write_text(f"{key} = 1\n")
    assert main(["prune", "--config", str(tmp_path / "exp.toml"), "--runs-root", str(tmp_path / "runs")]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"exp.toml: unknown setting(s) ['{key}'] (did you mean retrain_epochs?)" in line
    assert not (tmp_path / "runs").exists()


def test_choices_in_any_case_are_one_setting_and_one_run_folder(tmp_path, capsys):
    argv = ["train", *SMALL, "--epochs", "1", "--runs-root", str(tmp_path)]
    assert main([*argv, "--optimizer", "SGD", "--amp", "BF16", "--lr-schedule", "Cosine", "--score", "PAPER"]) == 0
    assert main([*argv, "--optimizer", "sgd", "--amp", "bf16", "--lr-schedule", "cosine", "--score", "paper"]) == 0
    (run_dir,) = runs_in(tmp_path)
    stored = json.loads((run_dir / "config.json").read_text())
    assert (stored["optimizer"], stored["amp"], stored["lr_schedule"], stored["score"]) == ("sgd", "bf16", "cosine", "paper")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--lr", "1e308"], "setting lr 1e+308 overflows the float32 weights"),
        (["--retrain-lr", "1e300"], "setting retrain_lr 1e+300 overflows"),
        (["--weight-decay", "1e300"], "setting weight_decay 1e+300 overflows"),
        (["--gamma", "1e300", "--milestones", "1", "2"], "setting gamma 1e+300 at 2 milestone(s) raises lr"),
    ],
)
def test_settings_that_overflow_float32_are_refused_before_anything_is_created(flags, needle, capsys, tmp_path):
    assert main(["prune", "--preset", "demo", *flags, "--runs-root", str(tmp_path / "runs")]) == 1
    assert needle in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", ["--lr", "--momentum", "--weight-decay", "--gamma"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_settings_are_refused_before_anything_is_created(flag, value, capsys, tmp_path):
    assert main(["prune", "--preset", "demo", flag, value, "--runs-root", str(tmp_path / "runs")]) == 1
    assert "must be a finite number" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bug", [RuntimeError("internal"), KeyError("internal")])
def test_bugs_are_not_disguised_as_user_errors(bug, monkeypatch):
    def broken(_args):
        raise bug

    monkeypatch.setattr("nnrelief.cli._cmd_eval", broken)
    with pytest.raises(type(bug)):
        main(["eval", "model.pt"])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    threads = torch.get_num_threads()
    code = main(["prune", *SMALL, "--runs-root", str(root)])
    torch.set_num_threads(threads)
    assert code == 0
    (run_dir,) = runs_in(root)
    return run_dir


def test_prune_prints_table_and_writes_run(small_run, capsys):
    assert small_run.name.startswith("lenet300_100-mnist-sample-")
    rows = json.loads((small_run / "history.json").read_text())["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    # the same command again: nothing recomputed (no model file rewritten), the table and one line saying so
    written = {p.name: p.stat().st_mtime_ns for p in small_run.glob("*.pt")}
    assert main(["prune", *SMALL, "--runs-root", str(small_run.parent)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in small_run.glob("*.pt")} == written
    out = capsys.readouterr().out
    assert "val before" in out and "test after" in out and "compr." in out and out.count("\n") >= 5
    assert out.splitlines()[-1].endswith("already finished (2 iterations, selected model-iter2.pt); nothing to do")


def test_train_then_prune_share_the_run_folder(small_run, capsys):
    assert main(["train", *SMALL, "--runs-root", str(small_run.parent)]) == 0
    with open(small_run / ".lock") as lock:  # released when the command ends (another process may go on)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    out = capsys.readouterr().out
    assert "test accuracy" in out and str(small_run / "trained.pt") in out


def test_eval_checkpoint(small_run, capsys):
    assert main(["eval", str(small_run / "model-iter2.pt"), "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    history = json.loads((small_run / "history.json").read_text())["iterations"]
    assert f"accuracy: {100 * history[2]['accuracy_after']['test']:.2f}%" in out
    assert f"{history[2]['params_remaining']:,} / 266,610 remaining" in out
    assert "fc1" in out and "MACs" in out


def test_compact_checkpoint(small_run, tmp_path, capsys):
    checkpoint = small_run / "model-iter2.pt"
    out_file, sparse_file = tmp_path / "small.pt", tmp_path / "small.sparse"
    assert main(["compact", str(checkpoint), "-o", str(out_file), "--sparse", str(sparse_file), "-q"]) == 0
    out = capsys.readouterr().out
    assert "compacted" in out and "MACs" in out and f"wrote {out_file}" in out
    masked, _ = load_weights(checkpoint)
    scripted = torch.jit.load(str(out_file))
    x = torch.rand(5, 1, 28, 28)
    assert torch.allclose(scripted(x), masked(x), atol=1e-5)
    assert sparse_file.stat().st_size < checkpoint.stat().st_size


def test_eval_of_a_run_folder_names_its_selected_model(small_run, capsys):
    assert main(["eval", str(small_run), "-q"]) == 1
    assert f"{small_run} is a folder; give a weights file, e.g. {small_run / 'model-iter2.pt'}" in one_line_error(
        capsys.readouterr().err)  # fmt: skip


@pytest.mark.parametrize("command", ["eval", "compact"])
def test_a_dataset_that_does_not_fit_the_model_is_refused(command, small_run, tmp_path, capsys):
    argv = [command, str(small_run / "model-iter2.pt"), "--dataset", "cifar10", "-q"]
    assert main(argv + (["-o", str(tmp_path / "small.pt")] if command == "compact" else [])) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "model lenet300_100 takes inputs (1, 28, 28), but dataset cifar10 has images (3, 32, 32)" in line
    assert not (tmp_path / "small.pt").exists()


@pytest.mark.parametrize(
    "flags,needle",
    [(["--iteration", "99"], "iteration 99 is not a pruning iteration of"), (["--samples", "0"], "samples >= 1")],
)
def test_report_choices_the_run_cannot_meet_are_errors(flags, needle, small_run, tmp_path, capsys):
    assert main(["report", str(small_run), "-o", str(tmp_path / "out"), *flags, "-q"]) == 1
    assert needle in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_model_names_the_first_differences_in_a_few_lines(small_run, capsys):
    assert main(["eval", str(small_run / "model-iter2.pt"), "--model", "lenet5", "--device", "cpu", "-q"]) == 1
    first, *details = capsys.readouterr().err.splitlines()
    assert "does not fit model lenet5" in first and "4 keys of other shapes, 4 keys missing, 4 keys not in the model" in first
    assert len(details) == 3 and "fc1.weight: checkpoint (300, 784), model (500, 800)" in details[0]
    assert "conv1.weight" in details[1] and "fc3.weight" in details[2] and "(+1 more)" in details[2]


def test_compact_format_follows_the_extension(small_run, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    checkpoint = small_run / "model-iter2.pt"
    assert main(["compact", str(checkpoint), "-o", str(tmp_path / "small.onnx"), "-q"]) == 0
    onnx.checker.check_model(onnx.load(str(tmp_path / "small.onnx")))
    assert main(["compact", str(checkpoint), "-o", str(tmp_path / "small.sparse"), "-q"]) == 0
    example = torch.rand(2, 1, 28, 28)
    smaller = compact(load_weights(checkpoint)[0], example)
    expected = smaller(example)
    with torch.no_grad():
        for tensor in smaller.parameters():
            tensor.zero_()
    assert torch.allclose(load_sparse(tmp_path / "small.sparse", smaller)(example), expected)
    capsys.readouterr()
    assert main(["compact", str(checkpoint), "-o", str(tmp_path / "small.bin"), "-q"]) == 1
    assert "unknown extension '.bin'" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "small.bin").exists()


def _torch_handlers_write_to_capsys(monkeypatch):
    """torch's loggers write through their own handlers, to the stderr of torch's import."""
    for name in ("torch", "torch.onnx", "torch.export", "torch._dynamo"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                monkeypatch.setattr(handler, "stream", sys.stderr)


def test_export_is_quiet_by_default_and_v_says_once_how_the_model_was_analysed(small_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    _torch_handlers_write_to_capsys(monkeypatch)
    argv = ["compact", str(small_run / "model-iter2.pt"), "-o", str(tmp_path / "small.pt2"), "--onnx", str(tmp_path / "small.onnx")]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    assert main([*argv, "-v"]) == 0
    err = capsys.readouterr().err
    assert err.count("analysed: channel graph from torch.export") == 1 and "INFO nnrelief.analysis: LeNet300100" in err


def test_default_output_is_bars_and_results_per_epoch_lines_with_v(tmp_path, capsys):
    quiet_flags = [a for a in SMALL if a != "-q"]
    assert main(["train", *quiet_flags, "--run-dir", str(tmp_path / "a")]) == 0
    assert "epoch" not in capsys.readouterr().err
    assert main(["train", *quiet_flags, "--run-dir", str(tmp_path / "other" / "b"), "-v"]) == 0  # not a's dense model
    assert "epoch 1/1" in capsys.readouterr().err


def test_run_folder_collision_is_refused(small_run, capsys):
    argv = ["train", *SMALL, "--run-dir", str(small_run), "--lr", "0.01"]
    assert main(argv) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "holds a run with other settings" in line and "lr: stored=0.001 now=0.01" in line


def test_config_file_and_flags(tmp_path, capsys):
    config = tmp_path / "exp.toml"
    config.write_text('preset = "demo"\nepochs = 1\nnum_iters = 1\ntrain_subset = 500\nprune_samples = 200\namp = "bf16"\n')
    argv = ["train", "--config", str(config), "--val-size", "300", "--runs-root", str(tmp_path),
            "--no-progress", "--threads", "1", "-q", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    (run_dir,) = runs_in(tmp_path)
    assert run_dir.name.startswith("demo-")
    stored = json.loads((run_dir / "config.json").read_text())
    assert (stored["epochs"], stored["num_iters"], stored["train_subset"], stored["val_size"]) == (1, 1, 500, 300)
    assert stored["model"] == "lenet300_100" and stored["rewind"] is True
    assert stored["amp"] == "bf16" and stored["compile"] is False  # bf16 is ignored on the CPU


# ----------------------------------------------------------------------------- pass choices


def reports(run_dir: Path) -> list[dict]:
    return [row["report"] for row in json.loads((run_dir / "history.json").read_text())["iterations"][1:]]


def test_ignore_keeps_a_layer_dense_and_target_remaining_is_each_pass_fraction(tmp_path):
    flags = [*SMALL, "--ignore", "fc3", "--target-remaining", "0.5", "--run-dir", str(tmp_path / "run")]
    assert main(["prune", *flags]) == 0
    first, second = reports(tmp_path / "run")
    assert first["remaining_fraction"] == pytest.approx(0.5, abs=0.02)
    assert second["remaining_fraction"] == pytest.approx(0.25, abs=0.02)
    assert [layer["name"] for layer in first["layers"]] == ["fc1", "fc2"] and "fc3" in first["skipped"]
    model, _ = load_weights(tmp_path / "run" / "model-iter2.pt")
    assert current_mask(model.fc3).all() and not current_mask(model.fc1).all()


def test_alphas_choose_the_alpha_of_matching_layers(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text('alphas = {"fc1" = 0.5, "fc*" = 0.99}\n')
    assert main(["prune", *SMALL, "--num-iters", "1", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    (report,) = reports(tmp_path / "run")
    assert report["settings"]["alphas"] == {"fc1": 0.5, "fc*": 0.99}
    kept = {layer["name"]: layer["weights_kept"] / layer["weights_total"] for layer in report["layers"]}
    assert kept["fc1"] < 0.5 < kept["fc2"]


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--ignore", "fc9"], "setting ignore: pattern 'fc9' matches no layer of lenet300_100 (fc1, fc2, fc3) (flag --ignore)"),
        (["--only", "conv*"], "setting only: pattern 'conv*' matches no layer"),
        (["--alphas", "fc1"], "setting alphas entries are PATTERN=ALPHA with ALPHA in (0, 1]"),
        (["--alphas", "fc1=0"], "got 'fc1=0' (flag --alphas)"),
        (["--ignore", "fc*"], "spare every layer of lenet300_100: nothing to prune"),
        (["--target-remaining", "1"], "setting target_remaining must be in (0, 1), got 1.0 (flag --target-remaining)"),
        (["--target-remaining", "0.5", "--alphas", "fc1=0.5"], "give one of --alphas and --target-remaining"),
    ],
)
def test_bad_pass_choices_are_refused_before_anything_is_created(flags, needle, tmp_path, capsys):
    assert main(["prune", *SMALL, *flags, "--runs-root", str(tmp_path / "runs")]) == 1
    assert needle in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_pass_choices_are_in_the_rebuilt_command_and_the_folder_hash():
    overrides = {"ignore": ["fc3"], "alphas": ["fc1=0.8", "fc*=0.99"], "dataset": "mnist-sample"}
    cfg, _ = resolve_config(None, None, overrides)
    words = shlex.split(reproduce_command(cfg))
    assert words[words.index("--ignore") + 1] == "fc3" and "--target-remaining" not in words
    assert words[words.index("--alphas") + 1 : words.index("--alphas") + 3] == ["fc1=0.8", "fc*=0.99"]
    args = build_parser().parse_args(words[1:])
    names = [name for name in specs(ExperimentConfig) if hasattr(args, name)]
    rebuilt, _ = resolve_config(None, None, {name: getattr(args, name) for name in names})
    assert rebuilt.config_hash() == cfg.config_hash()
    swapped, _ = resolve_config(None, None, {**overrides, "alphas": ["fc*=0.99", "fc1=0.8"]})
    assert swapped.config_hash() != cfg.config_hash()  # the first match wins: the order is a setting


# ----------------------------------------------------------------------------- resume after kill

RESUME = [
    "--dataset", "mnist-sample", "--epochs", "2", "--retrain-epochs", "3", "--milestones", "1",
    "--retrain-milestones", "2", "--batch-size", "50", "--num-iters", "2", "--prune-samples", "500",
    "--rewind", "--device", "cpu", "--no-progress", "--threads", "1", "-q",
]  # fmt: skip


def start(run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "nnrelief", "prune", *RESUME, "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def kill_when(process: subprocess.Popen, path: Callable[[], Path | None], timeout: float = 600) -> None:
    """SIGKILL ``process`` as soon as the file ``path()`` names exists (then it is inside the next epoch)."""
    deadline = time.monotonic() + timeout
    while (found := path()) is None or not found.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{found} did not appear"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def runs_in(root: Path) -> list[Path]:
    """The run folders in ``root`` (not the shared dense models' folder)."""
    return [p for p in root.iterdir() if p.is_dir() and p.name != "dense"]


def history_without_times(run_dir: Path) -> list[dict]:
    rows = json.loads((run_dir / "history.json").read_text())["iterations"]
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


def test_killed_run_resumes_to_the_same_history(tmp_path):
    reference = start(tmp_path / "a" / "reference")
    run_dir = tmp_path / "b" / "interrupted"  # its own shared dense folder, tmp_path/b/dense
    interrupted = start(run_dir)
    kill_when(interrupted, lambda: next((tmp_path / "b" / "dense").glob("*/dense.ckpt"), None))  # during dense training
    interrupted = start(run_dir)
    kill_when(interrupted, lambda: run_dir / "retrain-1.ckpt")  # mid retraining
    interrupted = start(run_dir)
    kill_when(interrupted, lambda: run_dir / "retrain-2.ckpt")
    interrupted = start(run_dir)
    out, err = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 0, err
    assert "selected model" in out
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert history_without_times(run_dir) == history_without_times(tmp_path / "a" / "reference")
    final = [torch.load(d / "model-iter2.pt", weights_only=True) for d in (tmp_path / "a" / "reference", run_dir)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
