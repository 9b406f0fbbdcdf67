"""nnrelief.prune on the paper's models, on an unusual user model, and on bad input."""

import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import nnrelief
from nnrelief.analysis import analyse
from nnrelief.inputs import ModelInput
from nnrelief.models import lenet5, lenet300_100, resnet20, vgg_like
from nnrelief.pruning.masks import current_mask, state_with_masks
from nnrelief.pruning.stats import add_statistics, collect


def check_pruned(model, report):
    """Effective weights are zero where masked and the report agrees with the masks."""
    by_name = dict(model.named_modules())
    assert report.layers and report.kept < report.total
    for layer in report.layers:
        module = by_name[layer.name]
        weight_mask = current_mask(module, "weight")
        assert not module.weight[~weight_mask].any()
        assert layer.weights_kept == int(weight_mask.sum())
        if module.bias is not None:
            assert not module.bias[~current_mask(module, "bias")].any()
    assert report.compression == pytest.approx(report.total / report.kept)


@pytest.mark.parametrize(
    "make_model,shape",
    [(lenet300_100, (1, 28, 28)), (lenet5, (1, 28, 28)), (vgg_like, (3, 32, 32)), (resnet20, (3, 32, 32))],
    ids=["lenet300_100", "lenet5", "vgg_like", "resnet20"],
)
@pytest.mark.parametrize("score", ["paper", "authors"])
def test_paper_models(make_model, shape, score):
    torch.manual_seed(0)
    model = make_model()
    x = torch.rand(24, *shape)
    report = nnrelief.prune(model, [(x[:10], None), (x[10:], None)], alpha_fc=0.9, alpha_conv=0.9, score=score, progress=False)
    check_pruned(model, report)
    out = model.eval()(x[:2])
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    last = report.layers[-1]
    assert last.channels_alive == last.channels_total == 10  # classes are never removed
    data = report.to_dict()
    assert data["kept"] == report.kept and len(data["layers"]) == len(report.layers)
    assert "compression" in report.table()


class Unusual(nn.Module):
    """Two conv branches concatenated, a depthwise conv, an SE-style sigmoid gate, dilation,
    a view-flatten, a Linear over tokens and functional activations."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 4, 3, padding=1)
        self.right = nn.Sequential(nn.Conv2d(3, 4, 5, stride=1, padding=4, dilation=2, bias=False), nn.BatchNorm2d(4))
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.squeeze = nn.Linear(8, 8)
        self.down = nn.Conv2d(8, 6, 3, stride=2)
        self.tokens = nn.Linear(6, 6)
        self.head = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        x = torch.cat([F.leaky_relu(self.left(x)), F.relu(self.right(x))], dim=1)
        x = self.depthwise(x)
        x = x * torch.sigmoid(self.squeeze(x.mean((2, 3)))).view(x.size(0), -1, 1, 1)
        x = F.relu(self.down(x))
        t = self.tokens(x.flatten(2).transpose(1, 2)).transpose(1, 2)
        return self.head(t.reshape(x.size(0), -1))


def test_unusual_user_model(caplog):
    torch.manual_seed(0)
    model = Unusual()
    x = torch.randn(20, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="nnrelief"):
        report = nnrelief.prune(model, [x[:7], x[7:]], alpha_fc=0.8, alpha_conv=0.8, progress=False)
    assert "left unpruned" not in caplog.text and not report.skipped
    assert {layer.name for layer in report.layers} == {"left", "right.0", "depthwise", "squeeze", "down", "tokens", "head"}
    check_pruned(model, report)
    before = model.eval()(x)
    assert torch.isfinite(before).all()
    # a second pass works on the pruned model and only removes more
    kept = report.kept
    assert nnrelief.prune(model, [x], alpha_fc=0.8, alpha_conv=0.8, progress=False).kept <= kept


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.fc2(F.relu(self.fc1(x)))


def test_untraceable_model_is_pruned_layer_by_layer(caplog):
    torch.manual_seed(0)
    model = Untraceable()
    with caplog.at_level(logging.INFO, logger="nnrelief"):
        report = nnrelief.prune(model, [torch.randn(10, 6)], alpha_fc=0.7, progress=False)
    assert "torch.export could not capture Untraceable" in caplog.text
    assert report.analysis.startswith("connection level: torch.export could not capture")
    assert "no structure cleaning" in report.table()
    assert not [r for r in caplog.records if r.name.startswith("torch")]  # torch's own tracing noise kept out
    check_pruned(model, report)


def test_statistics_of_shards_add_up():
    torch.manual_seed(0)
    model = resnet20().eval()
    x = torch.randn(12, 3, 32, 32)
    graph = analyse(model, ModelInput((x,)))

    def stats(*parts):
        return collect(graph, [ModelInput((part,)) for part in parts], "paper", model)

    whole = stats(x)
    shards = add_statistics(stats(x[:5]), stats(x[5:]))
    for key in whole:
        for name in whole[key]:
            assert torch.allclose(whole[key][name], shards[key][name], rtol=1e-5, atol=1e-4), (key, name)


def test_statistics_size_does_not_grow_with_samples():
    model = lenet5().eval()
    graph = analyse(model, ModelInput((torch.rand(2, 1, 28, 28),)))
    small = collect(graph, [ModelInput((torch.rand(10, 1, 28, 28),))], "paper", model)
    large = collect(graph, [ModelInput((torch.rand(100, 1, 28, 28),))] * 20, "paper", model)
    for key in small:
        for name in small[key]:
            assert small[key][name].shape == large[key][name].shape


def _distributed_worker(rank, world, port, x, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = lenet5()
        shard = x[rank::world]
        nnrelief.prune(model, [shard], alpha_fc=0.9, alpha_conv=0.9, progress=False)
        if rank == 0:
            result.update({k: v.clone() for k, v in state_with_masks(model).items() if k.endswith("_mask")})
    finally:
        dist.destroy_process_group()


def test_distributed_shards_give_the_single_process_masks():
    torch.manual_seed(1)
    x = torch.rand(40, 1, 28, 28)
    manager = mp.Manager()
    result = manager.dict()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_distributed_worker, args=(2, port, x, result), nprocs=2, join=True)
    torch.manual_seed(0)
    single = lenet5()
    nnrelief.prune(single, [x], alpha_fc=0.9, alpha_conv=0.9, progress=False)
    for key, value in state_with_masks(single).items():
        if key.endswith("_mask"):
            differing = int((value != result[key]).sum())
            assert differing <= max(1, value.numel() // 10000), key  # float sums in another order


@pytest.mark.parametrize("alpha", [0.0, 1.5, -1])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha_fc must lie in"):
        nnrelief.prune(lenet300_100(), [torch.rand(4, 1, 28, 28)], alpha_fc=alpha)


def test_bad_score_mode():
    with pytest.raises(ValueError, match="score must be one of"):
        nnrelief.prune(lenet300_100(), [torch.rand(4, 1, 28, 28)], score="magnitude")


def test_no_batches():
    with pytest.raises(ValueError, match="no pruning batches"):
        nnrelief.prune(lenet300_100(), [])


def test_nan_input_is_rejected_and_model_untouched():
    model = lenet300_100()
    x = torch.rand(4, 1, 28, 28)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 1 .*NaN or inf"):
        nnrelief.prune(model, [x, bad])
    assert not hasattr(model.fc1, "weight_mask")


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(a + b)


def test_nan_in_any_input_of_a_multi_input_batch_is_named():
    """Every tensor of a (positional inputs, target) batch is checked, not only the first."""
    model = _TwoInputs()
    a, b = torch.rand(4, 8), torch.rand(4, 8)
    bad = b.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"batch 1 \(shape \(4, 8\)\) contains NaN or inf"):
        nnrelief.prune(model, [((a, b), None), ((a, bad), None)], progress=False)
    assert not hasattr(model.fc, "weight_mask")


@pytest.mark.parametrize("where", ["fc2.weight", "fc1.bias"])
def test_non_finite_weights_are_refused_naming_the_layer_and_model_unchanged(where):
    model = lenet300_100()
    nnrelief.prune(model, [torch.rand(8, 1, 28, 28)], alpha_fc=0.9, progress=False)
    module, _, leaf = where.rpartition(".")
    with torch.no_grad():
        getattr(model.get_submodule(module), leaf)[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"NaN or inf values in {where}; the model was left unchanged"):
        nnrelief.prune(model, [torch.rand(8, 1, 28, 28)], alpha_fc=0.5, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if k != where)


def test_pass_removing_every_weight_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="nnrelief"):
        report = nnrelief.prune(lenet300_100(), [torch.zeros(4, 1, 28, 28)], progress=False)
    assert report.kept == 0
    assert "removed every weight" in caplog.text


def test_shape_error_names_the_users_layer_not_tracing_internals():
    with pytest.raises(ValueError) as info:
        nnrelief.prune(lenet5(), [torch.rand(4, 1, 20, 20)], progress=False)
    message = str(info.value)
    assert "in layer fc1 (Linear)" in message and "mat1 and mat2 shapes cannot be multiplied" in message
    assert "ShapeProp" not in message and "call_module" not in message


def test_a_loader_error_is_not_blamed_on_the_model():
    def batches():
        yield torch.rand(4, 1, 28, 28)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        nnrelief.prune(lenet300_100(), batches(), progress=False)


def test_shape_the_model_rejects():
    with pytest.raises(ValueError, match=r"rejected a pruning batch of shape \(4, 3, 32, 32\)"):
        nnrelief.prune(lenet300_100(), [torch.rand(4, 3, 32, 32)])
    with pytest.raises(ValueError, match=r"rejected pruning batch 1 of shape \(4, 1, 20, 20\)"):
        nnrelief.prune(lenet300_100(), [torch.rand(4, 1, 28, 28), torch.rand(4, 1, 20, 20)], progress=False)


def test_wrong_batch_type():
    with pytest.raises(TypeError, match="expected an input tensor"):
        nnrelief.prune(lenet300_100(), ["not a tensor"])
    with pytest.raises(ValueError, match="rejected a pruning batch of shape \\(image="):
        nnrelief.prune(lenet300_100(), [{"image": torch.rand(2, 784)}])  # forward has no 'image'


def test_keyword_and_positional_batches():
    torch.manual_seed(0)
    model, x = lenet300_100(), torch.rand(8, 784)
    twin = lenet300_100()
    twin.load_state_dict(model.state_dict())
    nnrelief.prune(model, [x], progress=False)
    nnrelief.prune(twin, [{"x": x[:3]}, ((x[3:],), torch.zeros(5))], progress=False)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_model_without_prunable_layers():
    with pytest.raises(ValueError, match=r"no layer that NNrelief can prune \(Linear, .*, Conv1d/2d/3d, ConvTranspose1d/2d/3d\)"):
        nnrelief.prune(nn.Sequential(nn.ReLU()), [torch.rand(2, 3)])


def test_zero_samples_in_total_are_refused_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = lenet300_100()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="hold no samples"):
        nnrelief.prune(model, [torch.randn(0, 784), torch.randn(0, 784)], progress=False)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
