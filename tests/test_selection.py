"""The cumulative-alpha keep rule."""

import pytest
import torch

from nnrelief.pruning.selection import check_alpha, select


def rows(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_smallest_prefix_reaching_alpha():
    keep, _ = select(rows([5.0, 3.0, 2.0]), None, 0.75)  # cumulative 0.5, 0.8 -> two kept
    assert keep.tolist() == [[True, True, False]]
    keep, _ = select(rows([5.0, 3.0, 2.0]), None, 0.8)  # exactly reaching alpha stops there
    assert keep.tolist() == [[True, True, False]]
    keep, _ = select(rows([2.0, 5.0, 3.0]), None, 0.5)  # order of inputs does not matter
    assert keep.tolist() == [[False, True, False]]


def test_ties_with_the_boundary_are_kept():
    keep, _ = select(rows([4.0, 2.0, 2.0, 2.0]), None, 0.5)
    assert keep.tolist() == [[True, True, True, True]]


def test_alpha_one_keeps_exactly_the_nonzero():
    keep, bias = select(rows([0.5, 0.0, 0.5, 1e-9]), torch.tensor([0.0]), 1.0)
    assert keep.tolist() == [[True, False, True, True]] and bias.tolist() == [False]


def test_all_zero_neuron_keeps_nothing():
    keep, bias = select(torch.zeros(2, 3), torch.zeros(2), 0.9)
    assert not keep.any() and not bias.any()


def test_single_connection():
    keep, _ = select(rows([3.0]), None, 0.5)
    assert keep.tolist() == [[True]]


def test_bias_is_pruned_like_a_connection():
    keep, bias = select(rows([5.0, 4.0]), torch.tensor([1.0]), 0.8)
    assert keep.tolist() == [[True, True]] and bias.tolist() == [False]
    keep, bias = select(rows([1.0, 1.0]), torch.tensor([8.0]), 0.8)
    assert keep.tolist() == [[False, False]] and bias.tolist() == [True]


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.01, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_alpha(alpha)


def _slow_select(values, alpha):
    ranked = sorted(values, reverse=True)
    total, running, boundary = sum(ranked), 0.0, None
    for value in ranked:
        running += value
        if running >= alpha * total * (1 - 1e-9):
            boundary = value
            break
    return [value >= boundary and value > 0 for value in values] if total > 0 else [False] * len(values)


def test_matches_slow_loop_on_random_rows():
    torch.manual_seed(0)
    contrib = torch.rand(40, 17) ** 3
    contrib[contrib < 0.05] = 0
    bias = torch.rand(40) * 0.2
    for alpha in (0.5, 0.9, 0.95, 0.99, 1.0):
        keep, keep_bias = select(contrib, bias, alpha)
        for j in range(40):
            expected = _slow_select(contrib[j].double().tolist() + [float(bias[j])], alpha)
            assert keep[j].tolist() + [bool(keep_bias[j])] == expected
