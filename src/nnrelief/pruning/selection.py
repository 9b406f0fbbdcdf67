"""The cumulative-alpha keep rule of NNrelief (pure, vectorised over all neurons)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as float if it lies in (0, 1], else raise a ValueError saying so."""
    value = float(alpha)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1] (a fraction of each neuron's signal to keep), got {alpha!r}")
    return value


def select(contrib: Tensor, bias_share: Tensor | None, alpha: float) -> tuple[Tensor, Tensor | None]:
    """Keep masks for one layer by the paper's rule.

    ``contrib`` is (J, M): the contribution ``a_jm`` of every incoming connection of neuron
    ``j``; ``bias_share`` (J,) is the bias term or None. Per neuron, entries (connections and
    bias together) are ranked by score; the smallest prefix whose cumulative sum reaches
    ``alpha * S_j`` is found, and every entry whose score is at least the last score of that
    prefix is kept (ties with the boundary are kept). Entries with zero score are never
    kept, so ``alpha = 1`` keeps exactly the nonzero ones and an all-zero neuron keeps
    nothing. Returns boolean (J, M) and (J,) masks.
    """
    alpha = check_alpha(alpha)
    entries = contrib if bias_share is None else torch.cat([contrib, bias_share.unsqueeze(1)], dim=1)
    ordered = _descending(entries.float())
    cumulative = ordered.cumsum(dim=1, dtype=torch.float64)
    total = cumulative[:, -1:]
    # Relative tolerance against round-off in the cumulative sum (matters for alpha = 1).
    target = alpha * total * (1.0 - 1e-12 * entries.shape[1])
    boundary_index = (cumulative < target).sum(dim=1, keepdim=True).clamp_max(entries.shape[1] - 1)
    threshold = ordered.gather(1, boundary_index)
    entries = entries.float()
    keep = (entries >= threshold) & (entries > 0)
    if bias_share is None:
        return keep, None
    return keep[:, :-1], keep[:, -1]


def _descending(entries: Tensor) -> Tensor:
    """Each row of ``entries`` sorted in descending order. On the CPU numpy's sort (SIMD
    sorting networks) is several times faster than ``torch.sort``, which also computes the
    indices this rule does not need; the values are the same."""
    if entries.device.type != "cpu":
        return entries.sort(dim=1, descending=True).values
    return torch.from_numpy(np.sort(entries.numpy(), axis=1)).flip(1)


def select_nm(scores: Tensor, n: int, m: int) -> Tensor:
    """(J, K) keep mask: in every row, each group of ``m`` consecutive columns keeps its ``n``
    highest scores (ties: lowest index first; a score of 0 is never kept). K must be a multiple of m."""
    rows, width = scores.shape
    if width % m:
        raise ValueError(f"{width} columns do not split into groups of {m}")
    groups = scores.reshape(rows, width // m, m).float()
    order = groups.sort(dim=2, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order, True)
    return (keep & (groups > 0)).reshape(rows, width)
