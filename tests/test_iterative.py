"""nnrelief.iterative and nnrelief.experiment: the relieve loop, rewinding, resume, early stop, experiment configs.

The end-to-end tests train LeNet-300-100 on the MNIST sample shipped with the package
(a few hundred steps); the whole file takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import shutil
from fractions import Fraction

import pytest
import torch
from torch import nn

import nnrelief
from nnrelief import data as nndata
from nnrelief.experiments.config import (
    FREE_FIELDS,
    LATER_FIELDS,
    PRESETS,
    ConfigError,
    ExperimentConfig,
    RunConflictError,
    resolve_config,
    run_name,
)
from nnrelief.experiments.experiment import Experiment, claim_run_folder, load_weights, read_config
from nnrelief.experiments.history import History
from nnrelief.experiments.iterative import relieve, rewind
from nnrelief.experiments.runfolder import RunFolder, RunFolderError
from nnrelief.metrics import check_masks
from nnrelief.models import lenet300_100
from nnrelief.pruning.masks import current_mask, state_with_masks
from nnrelief.pruning.pass_settings import PassSettings
from nnrelief.reporting import load_run
from nnrelief.training import evaluate

TIMES = {"prune_seconds", "retrain_seconds", "seconds"}



def small_config(**changes) -> ExperimentConfig:
    settings = {
        "model": "lenet300_100", "dataset": "mnist-sample", "epochs": 2, "retrain_epochs": 1,
        "milestones": [], "retrain_milestones": [], "batch_size": 50, "train_subset": 2000, "val_size": 500,
        "prune_samples": 500, "num_iters": 3, "alpha_fc": 0.9, "device": "cpu",
    }  # fmt: skip
    settings.update(changes)
    return ExperimentConfig(**settings)


def without_times(history: History) -> list[dict]:
    return [{k: v for k, v in r.to_dict().items() if k not in TIMES} for r in history.records]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("run")
    history = Experiment(small_config(), run_dir, progress=False).run()
    torch.set_num_threads(threads)
    return run_dir, history


def test_end_to_end_accuracy_and_compression(finished_run):
    _, history = finished_run
    records = history.records
    assert [r.iteration for r in records] == [0, 1, 2, 3]
    assert records[0].accuracy_after["val"] > 0.8 and records[0].accuracy_after["test"] > 0.8
    assert all(r.accuracy_after["test"] > 0.5 for r in records)  # chance is 0.1
    remaining = [r.params_remaining for r in records]
    assert all(a > b for a, b in itertools.pairwise(remaining)), remaining
    assert records[0].params_remaining == records[0].params_total == 266_610
    assert records[-1].compression == pytest.approx(266_610 / remaining[-1])
    assert records[-1].macs_sparse < records[0].macs_sparse == records[0].macs_dense
    assert records[-1].alive["fc3"] == 10
    assert records[1].report is not None and records[1].report["kept"] == records[1].params_remaining
    assert not history.stopped_early and history.selected_iteration == 3


def test_masks_hold_after_retraining(finished_run):
    run_dir, history = finished_run
    for record in history.records[1:]:
        model, cfg = load_weights(run_dir / f"model-iter{record.iteration}.pt")
        assert cfg is not None and cfg.model == "lenet300_100"
        check_masks(model)  # the weights are zero where masked
        for layer in record.report["layers"]:
            module = dict(model.named_modules())[layer["name"]]
            assert int(current_mask(module, "weight").sum()) == layer["weights_kept"]
    # retraining did change the surviving weights
    assert any(r.accuracy_before != r.accuracy_after for r in history.records[1:])


def test_history_files_complete(finished_run):
    run_dir, history = finished_run
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    columns = history.columns()
    assert list(rows[0]) == columns
    for name in ("iteration", "val_acc_before", "val_acc_after", "test_acc_before", "test_acc_after",
                 "params_remaining", "params_total", "remaining_percent", "compression", "macs_dense",
                 "macs_sparse", "alive:fc1", "alive:fc2", "alive:fc3", "seconds"):  # fmt: skip
        assert name in columns
    assert all(value != "" for row in rows for value in row.values())
    assert [int(row["iteration"]) for row in rows] == [0, 1, 2, 3]
    saved = json.loads((run_dir / "history.json").read_text())
    assert saved["config"]["model"] == "lenet300_100"
    assert len(saved["iterations"]) == 4 and saved["columns"] == columns
    assert without_times(History.from_dict(saved)) == without_times(history)
    assert not list(run_dir.glob("*.ckpt")) and not list(run_dir.glob(".*.tmp"))


def test_finished_run_is_not_recomputed(finished_run):
    run_dir, history = finished_run
    again = Experiment(small_config(), run_dir, progress=False).run()
    assert again.to_dict() == history.to_dict()


def snapshot(folder) -> dict[str, tuple[int, int, int]]:
    """Every file of a run folder but its lock: (inode, size, mtime)."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}  # fmt: skip


def test_showing_a_finished_run_writes_nothing(finished_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    before = snapshot(run_dir)
    real_open = os.open

    def no_lock_file(path, *args, **kwargs):  # a folder this user may not write
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_lock_file)
    with Experiment(small_config(), run_dir, progress=False) as experiment:
        experiment.run()
    load_run(run_dir)
    load_weights(run_dir / "model-iter2.pt")
    assert snapshot(run_dir) == before


def test_damaged_history_is_named_and_repaired(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    good = (run_dir / "history.json").read_text()
    (run_dir / "history.json").write_text(good[: len(good) // 2])
    with pytest.raises(RunFolderError, match=f"{run_dir / 'history.json'} is damaged"):
        load_run(run_dir)
    Experiment(small_config(), run_dir, progress=False).run()
    assert (run_dir / "history.json").read_text() == good


def test_unreadable_state_is_rebuilt_or_named_without_unsafe_advice(finished_run, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    (run_dir / "checksums.json").unlink()  # as written before checksums: the state is unpickled
    torch.save({"format": 1, "object": Fraction(1, 3)}, run_dir / "relief_state.pt")  # not tensors only
    again = Experiment(small_config(), run_dir, progress=False).run()
    assert without_times(again) == without_times(finished_run[1])
    assert f"{run_dir / 'relief_state.pt'} cannot be read" in caplog.text
    assert "rebuilt from model-iter3.pt and history.json" in caplog.text
    torch.save({"format": 1, "object": Fraction(1, 3)}, run_dir / "relief_state.pt")
    (run_dir / "model-iter3.pt").unlink()  # what it would be rebuilt from
    with pytest.raises(RunFolderError) as info:
        Experiment(small_config(), run_dir, progress=False).run()
    message = str(info.value)
    assert str(run_dir / "relief_state.pt") in message and "cannot be rebuilt" in message and "restore it" in message
    assert "weights_only" not in message


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", "pickled"])
def test_unreadable_checkpoint_is_dropped_with_a_warning(content, tmp_path, caplog):
    run_dir = tmp_path / "run"
    experiment = Experiment(small_config(), run_dir, progress=False)
    if content == "pickled":
        torch.save({"epoch": Fraction(1, 2)}, run_dir / "dense.ckpt")
    else:
        (run_dir / "dense.ckpt").write_bytes(content)
    model = experiment.train_dense()
    assert f"{run_dir / 'dense.ckpt'} cannot be read" in caplog.text and "restarts from the beginning" in caplog.text
    assert "weights_only" not in caplog.text
    reference = Experiment(small_config(), tmp_path / "reference", progress=False).train_dense()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_a_kill_during_the_first_config_write_does_not_block_the_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".config.k2j3h4.tmp.json").write_text('{"model": "lenet3')  # what a kill leaves
    Experiment(small_config(), run_dir, progress=False).close()
    assert json.loads((run_dir / "config.json").read_text())["model"] == "lenet300_100"
    assert not list(run_dir.glob(".*.tmp*"))


def test_temporary_files_of_killed_writes_are_removed(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    own = [run_dir / ".retrain-2.a8d7.tmp.ckpt", run_dir / ".dense.x1.tmp.ckpt", run_dir / ".checksums.k2l3m4n5.tmp.json"]
    baseline = run_dir / "compare" / "random" / ".model-iter1.q.tmp.pt"  # a run folder of its own
    others = [run_dir / ".notes.x1.tmp.txt", run_dir / "report" / ".report.ab12.tmp.md"]
    for path in [*own, baseline, *others]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    Experiment(small_config(), run_dir, progress=False).close()
    assert not any(path.exists() for path in own)
    assert baseline.exists() and all(path.exists() for path in others)
    with RunFolder(baseline.parent):  # its own writer removes it
        assert not baseline.exists()
    assert all(path.exists() for path in others)


def test_extending_a_finished_run_equals_a_longer_run(finished_run, tmp_path):
    run_dir, _ = finished_run
    longer = Experiment(small_config(num_iters=4), tmp_path, progress=False).run()
    extended = Experiment(small_config(num_iters=4), run_dir, progress=False).run()
    assert without_times(extended) == without_times(longer)


def test_eval_of_checkpoint_matches_history(finished_run):
    run_dir, history = finished_run
    model, _cfg = load_weights(run_dir / "model-iter2.pt")
    test = nndata.load_dataset("mnist-sample", split="test")
    accuracy = evaluate(model, nndata.BatchLoader(test, 500, shuffle=False, seed=0), "cpu").accuracy
    assert accuracy == history.records[2].accuracy_after["test"]


# ----------------------------------------------------------------------------- library API


def mnist_batches(n: int = 600, batch: int = 200) -> list[tuple[torch.Tensor, torch.Tensor]]:
    train = nndata.load_dataset("mnist-sample", split="train")
    return list(nndata.BatchLoader(nndata.subset(train, range(n)), batch, shuffle=False, seed=0))


def sgd_steps(model: nn.Module, batches, steps: int = 5) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in batches[:steps]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def kept_fraction(model: nn.Module) -> float:
    masks = [current_mask(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    return float(sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks))


def test_rewind_sets_surviving_weights_to_init():
    torch.manual_seed(0)
    model = lenet300_100()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    batches = mnist_batches()
    sgd_steps(model, batches)
    nnrelief.prune(model, batches, alpha_fc=0.9, progress=False)
    masks = {k: v.clone() for k, v in state_with_masks(model).items() if k.endswith("_mask")}
    rewind(model, init)
    for name in ("fc1", "fc2", "fc3"):
        for kind in ("weight", "bias"):
            mask = masks[f"{name}.{kind}_mask"]
            expected = init[f"{name}.{kind}"] * mask
            assert torch.equal(getattr(getattr(model, name), kind), expected)
            assert torch.equal(current_mask(getattr(model, name), kind), mask)


def test_relieve_with_own_train_function_and_rewind():
    torch.manual_seed(0)
    model = lenet300_100()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    batches = mnist_batches()
    sgd_steps(model, batches, steps=3)
    seen = []

    def train_fn(net: nn.Module, iteration: int) -> None:
        # at entry the surviving weights are the initial ones, the pruned ones zero
        mask = net.fc1.weight_mask
        assert torch.equal(net.fc1.weight, init["fc1.weight"] * mask)
        seen.append(iteration)
        sgd_steps(net, batches, steps=3)

    history = relieve(
        model, prune_batches=batches, train_fn=train_fn, num_iters=2, settings=PassSettings(alpha_fc=0.9),
        eval_fns={"train": lambda m: evaluate(m, batches, "cpu").accuracy},
        rewind_state=init, progress=False,
    )  # fmt: skip
    assert seen == [1, 2]
    assert [r.iteration for r in history.records] == [0, 1, 2]
    assert history.records[2].params_remaining < history.records[1].params_remaining
    check_masks(model)


def test_relieve_resumes_after_a_crash_in_retraining(tmp_path):
    batches = mnist_batches()

    def run(run_dir, crash_at=None):
        torch.manual_seed(0)
        model = lenet300_100()

        def train_fn(net: nn.Module, iteration: int) -> None:
            if iteration == crash_at:
                raise KeyboardInterrupt("killed")
            torch.manual_seed(iteration)
            sgd_steps(net, batches, steps=3)

        return relieve(
            model, prune_batches=lambda it: batches[it % 3:], train_fn=train_fn, num_iters=3,
            eval_fns={"val": lambda m: evaluate(m, batches, "cpu").accuracy},
            run_dir=run_dir, progress=False,
        ), model  # fmt: skip

    reference, reference_model = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=2)
    state = torch.load(tmp_path / "b" / "relief_state.pt", weights_only=True)
    assert state["phase"] == "pruned" and state["pending"]["iteration"] == 2
    resumed, resumed_model = run(tmp_path / "b")
    assert without_times(resumed) == without_times(reference)
    for key, value in reference_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="other settings"):
        relieve(lenet300_100(), prune_batches=batches, train_fn=lambda m, i: None, num_iters=3,
                eval_fns={"val": kept_fraction}, settings=PassSettings(alpha_fc=0.5), run_dir=tmp_path / "b", progress=False)  # fmt: skip


def test_early_stop_keeps_last_model_within_margin(tmp_path):
    torch.manual_seed(0)
    model = lenet300_100()
    batches = mnist_batches()
    sgd_steps(model, batches)
    history = relieve(
        model, prune_batches=batches, train_fn=lambda m, i: None, num_iters=10, settings=PassSettings(alpha_fc=0.8),
        eval_fns={"val": kept_fraction}, early_stop_margin=0.85, run_dir=tmp_path, progress=False,
    )  # fmt: skip
    fractions = [r.accuracy_after["val"] for r in history.records]
    assert history.stopped_early
    assert fractions[-1] < 1.0 - 0.85 <= fractions[-2]
    assert history.selected_iteration == len(fractions) - 2
    assert kept_fraction(model) == pytest.approx(fractions[-2])
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["stopped_early"] and saved["selected_iteration"] == history.selected_iteration
    again = relieve(
        lenet300_100(), prune_batches=batches, train_fn=lambda m, i: None, num_iters=10, settings=PassSettings(alpha_fc=0.8),
        eval_fns={"val": kept_fraction}, early_stop_margin=0.85, run_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert again.to_dict() == history.to_dict()


def test_relieve_rejects_bad_arguments():
    model = lenet300_100()
    with pytest.raises(ValueError, match="eval_fns"):
        relieve(model, prune_batches=[torch.rand(2, 1, 28, 28)], train_fn=lambda m, i: None,
                eval_fns={}, num_iters=1)  # fmt: skip
    with pytest.raises(ValueError, match="early_stop_metric"):
        relieve(model, prune_batches=[torch.rand(2, 1, 28, 28)], train_fn=lambda m, i: None,
                eval_fns={"test": kept_fraction}, num_iters=1, early_stop_margin=0.1)  # fmt: skip


# ----------------------------------------------------------------------------- configs


def test_presets_are_valid_and_follow_the_paper():
    for name in PRESETS:
        cfg, label = resolve_config(name)
        assert label == name and run_name(cfg, label).startswith(f"{name}-")
    cfg, _ = resolve_config("resnet20-cifar10")
    assert (cfg.optimizer, cfg.lr, cfg.alpha_conv, cfg.alpha_fc, cfg.num_iters) == ("sgd", 0.1, 0.95, 0.99, 10)
    assert cfg.milestones == [80, 120] and cfg.retrain_milestones == [20, 40] and not cfg.rewind
    cfg, _ = resolve_config("lenet300-mnist")
    assert cfg.rewind and cfg.batch_size == 120 and cfg.num_classes == 10
    assert resolve_config("resnet56-cifar100")[0].prune_samples == 2000
    assert resolve_config("resnet56-cifar100")[0].num_classes == 100
    cfg, _ = resolve_config("mobilenetv2-cifar10")
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.lr_schedule, cfg.epochs) == ("mobilenetv2_cifar", "sgd", 0.1, "cosine", 200)


def test_config_precedence_and_file_errors(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('preset = "lenet5-mnist"\nepochs = 7\nmilestones = [3, 5]\nlr = 1\n')
    cfg, label = resolve_config(config_file=path, overrides={"epochs": 9})
    assert (label, cfg.model, cfg.epochs, cfg.milestones, cfg.lr) == ("lenet5-mnist", "lenet5", 9, [3, 5], 1.0)
    cfg, label = resolve_config("demo", config_file=path)
    assert (label, cfg.model, cfg.epochs) == ("demo", "lenet300_100", 7)
    path.write_text("epoch = 3\n")
    with pytest.raises(ConfigError, match="unknown setting.*epoch"):
        resolve_config(config_file=path)
    path.write_text('epochs = "3"\n')
    with pytest.raises(ConfigError, match="epochs must be of type int"):
        resolve_config(config_file=path)
    path.write_text("epochs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_config(config_file=path)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(config_file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_config("lenet")
    with pytest.raises(ConfigError, match="expects inputs"):
        ExperimentConfig(model="vgg16", dataset="mnist")
    with pytest.raises(ConfigError, match="alpha_fc"):
        ExperimentConfig(alpha_fc=0.0)
    with pytest.raises(ConfigError, match="optimizer"):
        ExperimentConfig(optimizer="rmsprop")


@pytest.mark.parametrize(
    "name,value",
    [("lr", float("nan")), ("lr", float("inf")), ("retrain_lr", float("nan")), ("momentum", float("nan")),
     ("momentum", float("-inf")), ("weight_decay", float("nan")), ("weight_decay", float("inf")),
     ("gamma", float("nan")), ("gamma", float("inf")), ("alpha_fc", float("nan")),
     ("early_stop_margin", float("nan")), ("early_stop_margin", float("inf")), ("momentum", 1.5),
     ("weight_decay", -1e-4), ("gamma", 0.0), ("lr", -0.1)],
)  # fmt: skip
def test_every_number_must_be_finite_and_in_range(name, value):
    with pytest.raises(ConfigError, match=f"setting {name} must be"):
        ExperimentConfig(**{name: value})


def test_config_hash_ignores_only_free_fields():
    base = ExperimentConfig()
    assert base.config_hash() == ExperimentConfig(device="cpu", data_dir="/x", num_iters=3).config_hash()
    assert base.config_hash() != ExperimentConfig(seed=1).config_hash()
    assert base.config_hash() != ExperimentConfig(alpha_fc=0.9).config_hash()


def test_later_fields_keep_old_run_folders_valid(tmp_path):
    """A setting added after a run folder was written neither renames nor refuses it."""
    base = ExperimentConfig()
    assert {"lr_schedule", "amp", "compile", "ignore", "only", "alphas", "target_remaining"} <= set(LATER_FIELDS)
    old = {k: v for k, v in base.to_dict().items() if k not in LATER_FIELDS}
    digest = hashlib.sha256(
        json.dumps({k: v for k, v in old.items() if k not in FREE_FIELDS}, sort_keys=True).encode()
    ).hexdigest()[:8]
    assert base.config_hash() == digest
    assert ExperimentConfig(lr_schedule="cosine").config_hash() != digest
    assert ExperimentConfig(amp="bf16").config_hash() != digest
    (tmp_path / "config.json").write_text(json.dumps(old))
    claim_run_folder(base, RunFolder(tmp_path))
    with pytest.raises(RunConflictError, match="lr_schedule"):
        claim_run_folder(ExperimentConfig(lr_schedule="cosine"), RunFolder(tmp_path))
    with pytest.raises(RunConflictError, match="amp"):
        claim_run_folder(ExperimentConfig(amp="bf16"), RunFolder(tmp_path))
    assert run_name(read_config(RunFolder(tmp_path)), "x") == run_name(base, "x") == f"x-{digest}"
    assert ExperimentConfig(ignore=["fc3"]).config_hash() != digest
    assert ExperimentConfig(target_remaining=0.5).config_hash() != digest
    with pytest.raises(RunConflictError, match=r"alphas: stored=\[\] now=\['fc1=0.5'\]"):
        claim_run_folder(ExperimentConfig(alphas={"fc1": 0.5}), RunFolder(tmp_path))


def test_pass_settings_are_stored_with_the_loop_state_only_when_made():
    defaults = {"alpha_fc": 0.95, "alpha_conv": 0.9, "score": "paper"}
    assert PassSettings().loop_settings() == defaults  # loop states written before the choices existed resume
    settings = PassSettings(ignore="fc3", target=0.5)
    assert settings.loop_settings() == {**defaults, "ignore": ["fc3"], "target_remaining": 0.5}
    assert [settings.at_iteration(k).target for k in (1, 2, 3)] == [0.5, 0.25, 0.125]
    assert settings.keywords()["ignore"] == ("fc3",) and PassSettings().at_iteration(4).target is None
    assert ExperimentConfig(ignore=["fc3"], target_remaining=0.5).pass_settings() == settings
    assert ExperimentConfig().pass_settings() == PassSettings()  # the defaults are declared once
    assert PassSettings(alphas={"fc*": 0.5}).alpha_of("fc1", "linear") == 0.5 and PassSettings().alpha_of("c", "conv") == 0.9
    with pytest.raises(ValueError, match="score must be one of"):
        PassSettings(score="fast")
    with pytest.raises(ValueError, match="alpha_conv must lie in"):
        PassSettings(alpha_conv=0.0)


def test_run_folder_with_other_settings_is_refused(tmp_path):
    Experiment(small_config(), tmp_path / "run", progress=False)
    with pytest.raises(RunConflictError, match="seed: stored=0 now=1"):
        Experiment(small_config(seed=1), tmp_path / "run", progress=False)
    Experiment(small_config(num_iters=5), tmp_path / "run", progress=False)  # free field
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not a run folder: it holds other files .notes.txt."):
        Experiment(small_config(), tmp_path / "other", progress=False)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]  # no lock, nothing else


@pytest.mark.parametrize("label", [None, "magnitude"])
def test_the_iteration_bar_names_the_method(label, monkeypatch):
    from nnrelief.experiments import iterative
    from nnrelief.experiments.baselines import magnitude_prune

    bars = []
    real = iterative.tqdm
    monkeypatch.setattr(iterative, "tqdm", lambda **options: bars.append(options) or real(**{**options, "disable": True}))
    model = nn.Sequential(nn.Linear(4, 3))
    extra = {} if label is None else {"progress_label": label}
    relieve(model, prune_step=lambda m, k: magnitude_prune(m, {"0": 15 - 3 * k}), train_fn=lambda m, k: None,
            eval_fns={"val": lambda m: 0.5}, num_iters=2, input_shape=(4,), progress=True, **extra)  # fmt: skip
    assert [bar["desc"] for bar in bars] == [f"{label or 'nnrelief'} iterations"]
