"""One-shot pruning: NNrelief's per-layer target, BatchNorm recomputed, and ``nnrelief compare --one-shot``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import nnrelief
from nnrelief.cli import main
from nnrelief.experiments.methods import METHODS, Targets
from nnrelief.pruning.masks import current_mask
from nnrelief.training.batchnorm import recompute_batchnorm

SMALL = [
    "--preset", "demo", "--epochs", "1", "--train-subset", "1000", "--val-size", "500", "--prune-samples", "200",
    "--device", "cpu", "--no-progress", "--threads", "1", "-q",
]  # fmt: skip


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _fraction(layer: nn.Module) -> float:
    kept = int(current_mask(layer, "weight").sum()) + int(current_mask(layer, "bias").sum())
    return kept / (layer.weight.numel() + layer.bias.numel())


def test_layer_scope_brings_every_layer_to_the_target_after_cleaning() -> None:
    model = _mlp()
    batches = [torch.randn(64, 20) for _ in range(3)]
    report = nnrelief.prune(model, batches, target=0.4, target_scope="layer", progress=False)
    for index in (0, 2, 4):
        assert _fraction(model[index]) == pytest.approx(0.4, rel=0.02)
    assert report.settings["target_scope"] == "layer" and set(report.settings["alphas_found"]) == {"0", "2", "4"}
    again = _mlp()  # the alphas found, given back, select the same masks
    nnrelief.prune(again, batches, alphas=report.settings["alphas_found"], progress=False)
    for index in (0, 2, 4):
        assert torch.equal(current_mask(again[index], "weight"), current_mask(model[index], "weight"))


def test_model_scope_reaches_the_target_over_all_layers_not_each() -> None:
    model = _mlp()
    report = nnrelief.prune(model, [torch.randn(64, 20)], target=0.4, progress=False)
    assert report.kept / report.total == pytest.approx(0.4, rel=0.02)
    assert max(_fraction(model[i]) for i in (0, 2, 4)) - min(_fraction(model[i]) for i in (0, 2, 4)) > 0.05


def test_layer_scope_needs_a_target() -> None:
    with pytest.raises(ValueError, match="needs a target"):
        nnrelief.prune(_mlp(), [torch.randn(4, 20)], target_scope="layer", progress=False)
    with pytest.raises(ValueError, match="target_scope must be one of"):
        nnrelief.prune(_mlp(), [torch.randn(4, 20)], target=0.5, target_scope="row", progress=False)


def test_batchnorm_recomputed_averages_every_batchs_mean_and_variance() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model[1].momentum = 0.3
    model.eval()
    model[2].train()
    batches = [torch.randn(5, 3, 8, 8) for _ in range(3)]
    assert recompute_batchnorm(model, batches) == 1
    features = [model[0](x).detach().transpose(0, 1).reshape(4, -1) for x in batches]
    assert torch.allclose(model[1].running_mean, torch.stack([f.mean(1) for f in features]).mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, torch.stack([f.var(1) for f in features]).mean(0), atol=1e-5)
    assert model[1].momentum == 0.3 and not model.training and not model[1].training and model[2].training


def test_data_driven_methods_get_their_iterations_batches() -> None:
    model = _mlp()
    seen = []

    def batches(iteration: int) -> list[torch.Tensor]:
        seen.append(iteration)
        return [torch.randn(8, 20)]

    targets = Targets.uniform({"0": 20 * 64 + 64, "2": 64 * 32 + 32, "4": 330}, 0.5, 0, (20,))
    METHODS["wanda"].step(targets, batches)(model, 1)
    METHODS["magnitude"].step(targets, batches)(_mlp(), 1)
    assert seen == [1]  # magnitude reads no data
    assert torch.equal(current_mask(model[0], "weight").sum(1), torch.full((64,), 10))  # round((672 - 64) / 64) per row


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    args = ["compare", "--one-shot", *SMALL, "--runs-root", str(root), "--sparsities", "0.5", "0.8", "--draws", "2",
            "--methods", "nnrelief", "nnrelief-layer", "magnitude", "global-magnitude", "wanda", "nnrelief-2:4",
            "row-magnitude-2:4"]  # fmt: skip
    assert main(args) == 0
    torch.set_num_threads(threads)
    (run,) = [p for p in root.iterdir() if p.name != "dense"]
    return run


def test_one_shot_rows_reach_every_sparsity(one_shot: Path) -> None:
    rows = json.loads((one_shot / "one-shot" / "rows.json").read_text())["rows"]
    cases = sorted((r["method"], r["sparsity"], r["draw"]) for r in rows)
    expected = [("dense", 0.0, 0)]
    for sparsity in (0.5, 0.8):
        expected += [(m, sparsity, d) for m in ("nnrelief", "nnrelief-layer", "wanda") for d in (0, 1)]
        expected += [(m, sparsity, 0) for m in ("magnitude", "global-magnitude")]
    expected += [("nnrelief-2:4", 0.5, 0), ("nnrelief-2:4", 0.5, 1), ("row-magnitude-2:4", 0.5, 0)]
    assert cases == sorted(expected)
    for row in rows:
        if row["method"] == "nnrelief-2:4":  # 2 of 4 at most, cleaning removes more
            assert 0.3 < row["remaining"] <= 0.5 + 1e-9, row
        else:
            assert row["remaining"] == pytest.approx(1.0 - row["sparsity"], abs=0.02), row
        assert 0.0 <= row["metric"] <= 100.0
    dense = next(r["metric"] for r in rows if r["method"] == "dense")
    assert dense > 50.0  # the demo MLP after one epoch on 1,000 samples
    draws = {r["draw"]: r["metric"] for r in rows if r["method"] == "wanda" and r["sparsity"] == 0.8}
    assert len(draws) == 2


def test_one_shot_table_figure_and_resuming(one_shot: Path, capsys) -> None:
    folder = one_shot / "one-shot"
    table = (folder / "one-shot.md").read_text()
    assert "| nnrelief-layer |" in table and "| 50% | 80% |" in table and " ± " in table
    assert (folder / "one-shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (folder / "rows.json").read_text()
    args = ["compare", "--one-shot", *SMALL, "--run-dir", str(one_shot), "--sparsities", "0.5", "0.8", "--draws", "2",
            "--methods", "nnrelief", "magnitude"]  # fmt: skip
    assert main(args) == 0  # every case is there: nothing runs again
    assert (folder / "rows.json").read_text() == before
    assert main([*args, "--test-samples", "100"]) != 0  # cases of another test set are not mixed in
    assert "test_samples=None, not 100" in capsys.readouterr().err
    assert (folder / "rows.json").read_text() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsities", "1.2"], "sparsities are fractions"),
        (["--methods", "l1-filter"], "unknown one-shot method l1-filter"),
        (["--draws", "0"], "draws must be at least 1"),
        (["--test-samples", "0"], "test_samples must be at least 1"),
    ],
)
def test_bad_one_shot_settings_are_refused_before_a_run_folder_exists(tmp_path: Path, extra: list[str], message: str, capsys) -> None:
    assert main(["compare", "--one-shot", *SMALL, "--runs-root", str(tmp_path), *extra]) != 0
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_one_shot_methods_are_refused_in_an_iterative_comparison(tmp_path: Path, capsys) -> None:
    assert main(["compare", *SMALL, "--runs-root", str(tmp_path), "--methods", "nnrelief-layer"]) != 0
    assert "only with --one-shot" in capsys.readouterr().err


def test_two_four_methods_keep_the_pattern_and_spare_layers_that_do_not_split() -> None:
    from nnrelief.experiments.oneshot import ONE_SHOT_METHODS

    class Stub:  # what the runners read of an experiment
        cfg = type("Cfg", (), {"ignore": (), "only": (), "score": "paper"})()

    for name in ("nnrelief-2:4", "wanda-2:4", "row-magnitude-2:4"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))  # 6 inputs: not in groups of 4
        ONE_SHOT_METHODS[name].run(model, 0.5, [torch.randn(32, 6)], Stub())  # type: ignore[arg-type]
        assert "weight_mask" not in dict(model[0].named_buffers()), name
        groups = current_mask(model[2], "weight").view(8, 4, 4).sum(dim=2)
        assert int(groups.max()) <= 2 and (name == "nnrelief-2:4" or bool((groups == 2).all())), name


def test_first_test_samples_evaluate_a_fixed_subset(tmp_path: Path) -> None:
    args = ["compare", "--one-shot", *SMALL, "--runs-root", str(tmp_path), "--sparsities", "0.5", "--draws", "1",
            "--methods", "magnitude", "--test-samples", "40"]  # fmt: skip
    assert main(args) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.name != "dense"]
    saved = json.loads((run / "one-shot" / "rows.json").read_text())
    assert saved["test_samples"] == 40 and "first 40 test samples" in saved["title"]
    assert all(round(row["metric"] * 40 / 100, 6).is_integer() for row in saved["rows"])  # accuracies of 40 samples
