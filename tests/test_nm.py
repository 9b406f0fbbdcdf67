"""N:M sparsity (``nnrelief.prune(..., nm=(n, m))``): the pattern after the pass (structure
cleaning included) on an MLP, a GPT-2 and a CNN, the scores it keeps by, the refusals, the
setting in experiments and on the command line, and the 2:4 GPU format (``-m cuda``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import nnrelief
from nnrelief.experiments.config import LATER_FIELDS, ConfigError, ExperimentConfig
from nnrelief.experiments.experiment import check_layer_patterns
from nnrelief.pruning.masks import current_mask, state_with_masks
from nnrelief.pruning.nm import nm_linear_mask
from nnrelief.pruning.pass_settings import PassSettings
from nnrelief.pruning.selection import select_nm


def _groups_along_inputs(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros per group of m consecutive inputs of a (out, in, *kernel) weight, at every
    kernel position: (out, in / m, *kernel)."""
    nonzero = (weight != 0).int()
    return nonzero.view(weight.shape[0], weight.shape[1] // m, m, *weight.shape[2:]).sum(2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8),
    )  # fmt: skip


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8)])
def test_every_group_of_an_mlp_keeps_at_most_n(n, m):
    model = _mlp()
    report = nnrelief.prune(model, [torch.randn(64, 16)], nm=(n, m), progress=False)
    for layer in (model[0], model[2], model[4]):
        counts = _groups_along_inputs(layer.weight.detach(), m)
        assert int(counts.max()) == n  # the pattern, reached where the scores allow
    assert report.settings["nm"] == (n, m) and report.to_dict()["settings"]["nm"] == (n, m)
    assert report.layers[-1].bias_kept == 8  # biases are not part of the groups


def test_a_linear_keeps_its_n_highest_scores_and_nothing_revives():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 6))
    layer, x = model[0], torch.randn(40, 16)
    scores = layer.weight.detach().abs() * x.abs().mean(0)
    nnrelief.prune(model, [x], alpha_fc=0.6, progress=False)
    before = current_mask(layer).clone()
    nnrelief.prune(model, [x], nm=(2, 4), progress=False)
    assert torch.equal(current_mask(layer), select_nm(scores * before, 2, 4))  # pruned weights score 0: never kept
    assert not (current_mask(layer) & ~before).any()


def test_linear_mask_is_the_same_row_block_by_row_block():
    torch.manual_seed(3)
    layer, mean_abs_input = nn.Linear(12, 7), torch.rand(12)
    whole = nm_linear_mask(layer, mean_abs_input, (1, 4), None, block_entries=1 << 20)
    by_row = nm_linear_mask(layer, mean_abs_input, (1, 4), None, block_entries=12)
    assert torch.equal(whole.weight, select_nm(layer.weight.detach().abs() * mean_abs_input, 1, 4))
    assert torch.equal(by_row.weight, whole.weight) and whole.bias.all()


def test_gpt2_conv1d_groups_run_along_its_stored_input_axis():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (8, 12))
    report = nnrelief.prune(model, [{"input_ids": ids}], nm=(2, 4), progress=False)
    conv1d = [module for module in model.modules() if type(module).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and {layer.name for layer in report.layers} >= {"transformer.h.0.attn.c_attn"}
    for module in conv1d:
        counts = _groups_along_inputs(module.weight.detach().t(), 4)  # stored (in, out): groups along dim 0
        assert int(counts.max()) == 2
    assert torch.isfinite(model(ids).logits).all()


def test_single_conv1d_matches_the_scores_by_input_rows():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(2)
    model = nn.Sequential(pytorch_utils.Conv1D(nf=6, nx=16))  # weight (16, 6)
    layer, x = model[0], torch.randn(30, 16)
    nn.init.normal_(layer.weight)
    scores = layer.weight.detach().t().abs() * x.abs().mean(0)
    nnrelief.prune(model, [x], nm=(2, 4), progress=False)
    assert torch.equal(current_mask(layer), select_nm(scores, 2, 4).t())


def test_a_cnn_keeps_n_of_m_input_channels_at_every_kernel_position():
    model = _cnn()
    batches = [torch.randn(16, 3, 8, 8)]
    report = nnrelief.prune(model, batches, nm=(2, 4), ignore="0", progress=False)
    assert report.skipped == {"0": "spared by ignore=/only=: every weight kept"}
    for index in (2, 5, 9):
        counts = _groups_along_inputs(model[index].weight.detach(), 4)
        assert int(counts.max()) == 2
    kernels = (model[2].weight.detach() != 0).flatten(2)
    assert torch.equal(kernels.all(2), kernels.any(2))  # whole kernels kept or removed
    assert torch.isfinite(model(batches[0])).all()


def test_layers_whose_inputs_do_not_split_are_refused_and_nothing_changes():
    model = _cnn()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"0 \(3 inputs\) do not split so: spare them with ignore=\['0'\]"):
        nnrelief.prune(model, [torch.randn(4, 3, 8, 8)], nm=(2, 4), progress=False)
    assert state_with_masks(model).keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    depthwise = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ValueError, match=r"1 \(1 inputs\)"):
        nnrelief.prune(depthwise, [torch.randn(2, 4, 6, 6)], nm=(2, 4), progress=False)


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"target": 0.5}, r"nm=\(2, 4\) replaces the alpha rule .*: leave out target=0.5"),
        ({"alphas": {"0": 0.5}}, r"leave out alphas=\{'0': 0.5\}"),
        ({"alpha_fc": 0.99, "alpha_conv": 0.8}, "leave out alpha_fc=0.99, alpha_conv=0.8"),
        ({"nm": (4, 4)}, "0 < n < m"),
        ({"nm": "2:4"}, r"pair of ints \(n, m\)"),
    ],
)
def test_nm_alone_and_well_formed(keywords, message):
    model = _mlp()
    with pytest.raises(ValueError, match=message):
        nnrelief.prune(model, [torch.randn(4, 16)], progress=False, **{"nm": (2, 4), **keywords})
    assert not any(key.endswith("_mask") for key in state_with_masks(model))


def test_experiment_setting_hash_and_loop_state():
    assert LATER_FIELDS["nm"] is None  # old run folders keep their names
    cfg = ExperimentConfig(nm="2:4")
    assert cfg.pass_settings() == PassSettings(nm=(2, 4)) and ExperimentConfig(nm=[2, 4]).nm == "2:4"
    assert cfg.config_hash() != ExperimentConfig().config_hash()
    assert PassSettings(nm=(2, 4)).loop_settings()["nm"] == [2, 4] and "nm" not in PassSettings().loop_settings()
    with pytest.raises(ConfigError, match="setting nm is written N:M .* got '2/4' \\(flag --nm\\)"):
        ExperimentConfig(nm="2/4")
    with pytest.raises(ConfigError, match="leave out alpha_fc=0.99 .*give --alpha-fc 0.95 --alpha-conv 0.9"):
        ExperimentConfig(nm="2:4", alpha_fc=0.99)
    with pytest.raises(ConfigError, match="conv1 \\(1 inputs\\) of lenet5 .* --ignore conv1 \\(flag --nm\\)"):
        check_layer_patterns(ExperimentConfig(model="lenet5", nm="2:4"))
    check_layer_patterns(ExperimentConfig(model="lenet5", nm="2:4", ignore=["conv1"]))


def test_command_line_flag(tmp_path, capsys):
    from nnrelief.cli import build_parser, main

    args = build_parser().parse_args(["prune", "--nm", "2:4"])
    assert args.nm == "2:4"
    assert main(["prune", "--dataset", "mnist-sample", "--nm", "2:x", "--runs-root", str(tmp_path)]) == 1
    assert "error: setting nm is written N:M with whole numbers 0 < N < M" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_command_line_run_keeps_the_pattern_through_retraining(tmp_path):
    from nnrelief.cli import main

    small = ["--dataset", "mnist-sample", "--model", "lenet300_100", "--epochs", "1", "--retrain-epochs", "1", "--milestones",
             "--retrain-milestones", "--train-subset", "600", "--val-size", "300", "--prune-samples", "200", "--num-iters", "2",
             "--device", "cpu", "--no-progress", "--threads", "1", "-q"]  # fmt: skip
    assert main(["prune", *small, "--nm", "2:4", "--run-dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["nm"] == "2:4"
    state = torch.load(tmp_path / "run" / "model-iter2.pt", weights_only=True)
    for name in ("fc1", "fc2", "fc3"):
        assert int(_groups_along_inputs(state[f"{name}.weight"], 4).max()) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU of compute capability 8.0 or higher (2:4 sparse tensor cores)")  # fmt: skip
def test_a_2_4_pruned_linear_runs_as_a_semi_structured_sparse_tensor(monkeypatch):
    """README's recipe: the weight of a Linear pruned 2:4 converts to PyTorch's semi-structured
    format (cuSPARSELt, or CUTLASS where this build lacks it) and gives the dense masked outputs."""
    cutlass = not torch.backends.cusparselt.is_available()
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", cutlass)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128)).half().cuda()
    layer, x = model[0], torch.randn(64, 256, dtype=torch.float16, device="cuda")
    nnrelief.prune(model, [x], nm=(2, 4), progress=False)
    assert int(_groups_along_inputs(layer.weight.detach(), 4).max()) == 2
    dense = layer(x)
    sparse = torch.sparse.to_sparse_semi_structured(layer.weight.detach())
    out = torch.nn.functional.linear(x, sparse, layer.bias)
    torch.testing.assert_close(out, dense, rtol=1e-2, atol=2e-2)
