"""The cumulative-alpha keep rule and the N:M rule."""

import pytest
import torch

from nnrelief.pruning.choices import parse_nm
from nnrelief.pruning.selection import check_alpha, check_nm, select, select_nm


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


def _slow_select_nm(row, n, m):
    """From the definition: in each group of m consecutive entries the n highest-scoring
    nonzero ones are kept, equal scores by lowest index first."""
    keep = [False] * len(row)
    for start in range(0, len(row), m):
        ranked = sorted(range(start, start + m), key=lambda i: (-row[i], i))
        for i in ranked[:n]:
            keep[i] = row[i] > 0
    return keep


def test_nm_hand_computed():
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.5, 0.5, 0.5, 0.0],
                           [0.0, 0.0, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0]])  # fmt: skip
    keep = select_nm(scores, 2, 4)
    # row 0: 0.4 and 0.3 of the first group; of three equal 0.5 the two lowest columns
    # row 1: one nonzero score in the first group (a zero is never kept), none in the second
    assert keep.tolist() == [[False, True, True, False, True, True, False, False],
                             [False, False, True, False, False, False, False, False]]  # fmt: skip
    assert select_nm(scores, 1, 2).tolist()[0] == [False, True, True, False, True, False, True, False]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_nm_matches_slow_loop_on_random_rows(n, m):
    torch.manual_seed(n * 10 + m)
    scores = (torch.rand(30, 4 * m) * 4).floor() / 4  # few values: many ties and zeros
    keep = select_nm(scores, n, m)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    for j in range(scores.shape[0]):
        assert keep[j].tolist() == _slow_select_nm(scores[j].tolist(), n, m)
    assert int(keep.view(30, -1, m).sum(-1).max()) == n


def test_nm_refuses_widths_and_pairs_that_do_not_fit():
    with pytest.raises(ValueError, match="6 columns do not split into groups of m=4"):
        select_nm(torch.rand(2, 6), 2, 4)
    for bad in [(4, 4), (0, 4), (2.0, 4), (2,), (True, 4), "2:4"]:
        with pytest.raises(ValueError, match="0 < n < m|pair of ints"):
            check_nm(bad)


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 1 : 8 ") == (1, 8)
    for bad in ["2-4", "2:", ":4", "a:b", "2.5:4", "-1:4", "4:2", "2:4:8"]:
        with pytest.raises(ValueError, match="N:M"):
            parse_nm(bad)
