"""The language-model path: the Shakespeare corpus (byte tokens, split by whole works), next-token
windows, the byte_llama preset, training with the loss as metric, resuming, and the run folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from nnrelief import data
from nnrelief.cli import main
from nnrelief.data import registry
from nnrelief.data.shakespeare import SPLIT_BYTES, SPLIT_WORKS, WORKS
from nnrelief.experiments.config import PRESETS, ConfigError, ExperimentConfig, resolve_config
from nnrelief.experiments.dense import dense_name
from nnrelief.models import MODELS, get_model
from nnrelief.training import EpochRecord, TrainConfig, fit
from nnrelief.training.checkpoint import Progress

transformers = pytest.importorskip("transformers")

TEXT = b"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40


def tiny_llama(num_classes: int = 256) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=num_classes, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, use_cache=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def stream(text: bytes = TEXT, split: str = "train") -> data.TokenStream:
    return data.TokenStream(torch.frombuffer(bytearray(text), dtype=torch.uint8), "shakespeare", split)


# ----------------------------------------------------------------------------- the corpus


def test_split_holds_out_whole_works_disjoint_and_complete() -> None:
    works = [set(SPLIT_WORKS[s]) for s in ("train", "val", "test")]
    assert sum(map(len, works)) == len(WORKS) == 42
    assert set().union(*works) == set(WORKS)
    assert SPLIT_WORKS["val"] == ("julius_caesar", "twelfth_night") and SPLIT_WORKS["test"] == ("hamlet", "tempest")
    assert list(SPLIT_WORKS["train"]) == sorted(SPLIT_WORKS["train"])


def test_splits_read_deterministically_as_the_works_bytes(shared_data_dir: Path) -> None:
    root = shared_data_dir / "shakespeare"
    for split in ("train", "val", "test"):
        tokens = data.load_dataset("shakespeare", shared_data_dir, split)
        assert len(tokens) == SPLIT_BYTES[split] and tokens.works == SPLIT_WORKS[split]
        assert torch.equal(tokens.tokens, data.load_dataset("shakespeare", shared_data_dir, split).tokens)
    val = data.load_dataset("shakespeare", shared_data_dir, "val")
    expected = b"".join((root / f"{work}.txt").read_bytes() for work in SPLIT_WORKS["val"])
    assert bytes(val.tokens.tolist()) == expected


def test_modified_or_missing_work_is_named(shared_data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shakespeare"
    folder.mkdir()
    for work in SPLIT_WORKS["val"]:
        shutil.copy(shared_data_dir / "shakespeare" / f"{work}.txt", folder)
    text = bytearray((folder / "twelfth_night.txt").read_bytes())
    text[100] ^= 1
    (folder / "twelfth_night.txt").write_bytes(bytes(text))
    with pytest.raises(data.ChecksumError, match="twelfth_night.txt.*sha256"):
        data.load_dataset("shakespeare", tmp_path, "val")
    with pytest.raises(data.DatasetNotFoundError, match="hamlet.txt.*no download"):
        data.load_dataset("shakespeare", tmp_path, "test")
    with pytest.raises(ValueError, match="has splits"):
        data.load_dataset("mnist-sample", split="val")


# ----------------------------------------------------------------------------- windows


def test_targets_are_the_inputs_shifted_by_one() -> None:
    tokens = stream()
    loader = data.SequenceLoader(tokens, 4, 32, shuffle=True, seed=0, steps=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for x, y in batches:
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):  # each row is a window of the text, the target its next byte
            assert bytes(row_x.tolist()) + bytes(row_y[-1:].tolist()) in TEXT
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], batches[0][0])


def test_evaluation_windows_predict_every_token_once() -> None:
    tokens = stream(bytes(range(256)) * 3)
    loader = data.SequenceLoader(tokens, 5, 10, shuffle=False, seed=0)
    targets = torch.cat([y.reshape(-1) for _, y in loader])
    n = (len(tokens) - 1) // 10 * 10
    assert torch.equal(targets, tokens.tokens[1:n + 1].long())
    halves = [data.SequenceLoader(tokens, 5, 10, shuffle=False, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([torch.cat([y for _, y in h]) for h in halves]).sort(0).values.sum(), targets.sum())


def test_loader_refuses_streams_shorter_than_a_window() -> None:
    with pytest.raises(ValueError, match="fewer than one window"):
        data.SequenceLoader(stream(b"abc"), 2, 8, shuffle=True, seed=0)


# ----------------------------------------------------------------------------- training


def _fit(epochs: int, checkpoint: Path | None = None, lr: float = 1e-2) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = tiny_llama()
    train = data.SequenceLoader(stream(), 8, 32, shuffle=True, seed=0, steps=6)
    val = data.SequenceLoader(stream(TEXT[:1000], "val"), 8, 32, shuffle=False, seed=0)
    cfg = TrainConfig(optimizer="adamw", lr=lr, epochs=epochs, device="cpu", metric="loss", seed=0)
    return model, fit(model, train, val, cfg, checkpoint_path=checkpoint, progress=False)


def test_tiny_language_model_learns_and_keeps_its_lowest_validation_loss() -> None:
    model, result = _fit(3)
    losses = [r.val_loss for r in result.history]
    assert result.history[-1].train_loss < result.history[0].train_loss - 0.5
    assert losses[-1] < losses[0]
    assert result.best_epoch == 1 + losses.index(min(losses)) and result.best_val_loss == min(losses)


def test_interrupted_language_model_training_resumes_exactly(tmp_path: Path) -> None:
    whole, done = _fit(3)
    _fit(2, tmp_path / "dense.ckpt")
    resumed, result = _fit(3, tmp_path / "dense.ckpt")
    assert result.resumed_from == 2
    assert [r.val_loss for r in result.history] == [r.val_loss for r in done.history]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


@pytest.mark.parametrize(("metric", "best"), [("loss", 3), ("accuracy", 4)])
def test_best_epoch_follows_the_metric_direction(metric: str, best: int) -> None:
    progress = Progress(metric=metric)
    for epoch, accuracy, loss in ((1, 0.5, 1.0), (2, 0.6, 1.2), (3, 0.55, 0.9), (4, 0.6, 0.9)):
        progress.add(EpochRecord(epoch, 1.0, 0.5, loss, accuracy, 1e-3, 1.0), nn.Linear(1, 1))
    assert progress.best_epoch == best


# ----------------------------------------------------------------------------- settings and the command


def test_preset_trains_byte_llama_on_shakespeare_judged_by_its_loss() -> None:
    cfg, label = resolve_config("llama-shakespeare")
    assert (cfg.model, cfg.dataset, label) == ("byte_llama", "shakespeare", "llama-shakespeare")
    assert cfg.train_config().metric == "loss" and resolve_config("lenet5-mnist")[0].train_config().metric == "accuracy"
    model = get_model("byte_llama", 256)
    assert 3_000_000 < sum(p.numel() for p in model.parameters()) < 4_000_000
    assert type(model.model.norm).__name__ == "LlamaRMSNorm" and hasattr(model.model.layers[0].mlp, "gate_proj")
    assert model(torch.randint(0, 256, (2, 256))).logits.shape == (2, 256, 256)


def test_settings_that_do_not_fit_the_dataset_are_refused() -> None:
    with pytest.raises(ConfigError, match="byte_llama expects token sequences, but dataset mnist holds images"):
        ExperimentConfig(model="byte_llama", dataset="mnist")
    with pytest.raises(ConfigError, match="lenet5 expects images"):
        ExperimentConfig(model="lenet5", dataset="shakespeare")
    with pytest.raises(ConfigError, match="val_size does not apply to the text dataset shakespeare"):
        ExperimentConfig(**{**PRESETS["llama-shakespeare"], "val_size": 100})
    with pytest.raises(ConfigError, match="steps_per_epoch applies to text datasets only"):
        ExperimentConfig(steps_per_epoch=10)


def test_existing_run_and_dense_folder_names_are_unchanged() -> None:
    """The hashes of main before the language model (steps_per_epoch and the metric added)."""
    for preset, run_hash, dense in (
        ("demo", "bc88265f", "lenet300_100-mnist-sample-385ab9aa"),
        ("lenet5-mnist", "32ac392b", "lenet5-mnist-d0bb427f"),
        ("resnet20-cifar10", "e05377e0", "resnet20-cifar10-8cec482d"),
    ):
        cfg = resolve_config(preset)[0]
        assert (cfg.config_hash(), dense_name(cfg)) == (run_hash, dense)


@pytest.fixture
def tiny_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """``shakespeare`` read from memory and ``byte_llama`` made tiny: the command's whole path in seconds."""
    texts = {"train": TEXT, "val": TEXT[7:1200], "test": TEXT[3:900]}
    spec = dataclasses.replace(
        registry.DATASETS["shakespeare"], split_files={s: () for s in texts}, num_samples={s: len(t) for s, t in texts.items()},
        reader=lambda root, split: stream(texts[split], split),
    )  # fmt: skip
    monkeypatch.setitem(registry.DATASETS, "shakespeare", spec)
    monkeypatch.setitem(MODELS, "byte_llama", tiny_llama)


def test_train_command_runs_resumes_and_reports_bits_per_byte(tiny_corpus, tmp_path: Path, capsys) -> None:
    args = ["train", "--preset", "llama-shakespeare", "--data-dir", str(tmp_path), "--epochs", "2", "--steps-per-epoch", "2",
            "--batch-size", "4", "--run-dir", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "dense byte_llama on shakespeare: validation " in first and " bits per byte (perplexity " in first
    assert {"config.json", "init.pt", "trained.pt"} <= {p.name for p in (tmp_path / "run").iterdir()}
    assert main(args) == 0  # the trained model is loaded, not trained again
    assert capsys.readouterr().out.splitlines()[0] == first.splitlines()[0]
    assert main(["prune", *args[1:]]) != 0
    assert "not supported yet" in capsys.readouterr().err


def test_one_shot_prunes_the_language_model_and_reports_bits_per_byte(tiny_corpus, tmp_path: Path, capsys) -> None:
    common = ["--preset", "llama-shakespeare", "--data-dir", str(tmp_path), "--epochs", "1", "--steps-per-epoch", "2",
              "--batch-size", "4", "--prune-samples", "4", "--ignore", "lm_head", "--no-progress", "--device", "cpu"]  # fmt: skip
    args = ["compare", "--one-shot", *common, "--run-dir", str(tmp_path / "run"), "--sparsities", "0.5", "--draws", "1",
            "--methods", "nnrelief", "magnitude", "wanda", "wanda-2:4", "--test-samples", "2"]  # fmt: skip
    assert main(args) == 0
    assert "Test bits per byte, no retraining" in capsys.readouterr().out
    rows = json.loads((tmp_path / "run" / "one-shot" / "rows.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"dense", "nnrelief", "magnitude", "wanda", "wanda-2:4"}
    for row in rows:
        assert 0.0 < row["metric"] < 9.0  # bits per byte of a byte model: at most 8 (uniform) and then some
        if row["method"] in ("magnitude", "wanda", "nnrelief"):
            assert row["remaining"] == pytest.approx(0.5, abs=0.02), row
