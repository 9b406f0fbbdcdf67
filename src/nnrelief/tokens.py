"""Padding positions left out of the statistics taken over token positions.

A batch given as a mapping holding an ``attention_mask`` of shape (B, T) (a Hugging Face
batch; 0 = padding) says which token positions are data. Padding positions' hidden states
are not, and would bias a mean over positions. Observers see only tensors, so the loop
feeding the batches holds the current batch's mask in :func:`real_tokens` (a context
variable, set per batch and cleared after it) and the observers read it with
:func:`current`. A tensor whose leading dims are (B, T) and which has a feature dim after
them then has its (b, t) rows weighted by the mask (:func:`row_weights`); any other tensor
(conv feature maps, pooled outputs, attention scores) counts every entry, as do batches
without such a mask (tensors, positional inputs).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

from .inputs import ModelInput

_CURRENT: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("nnrelief_real_tokens", default=None)


def attention_mask(model_input: ModelInput) -> Tensor | None:
    """The (B, T) ``attention_mask`` keyword input of a batch, or None."""
    mask = model_input.kwargs.get("attention_mask")
    return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None


@contextlib.contextmanager
def real_tokens(model_input: ModelInput, enabled: bool = True) -> Iterator[None]:
    """While the batch ``model_input`` runs, :func:`current` is its (B, T) bool mask of real
    tokens (None without an attention mask, or when not ``enabled``)."""
    mask = attention_mask(model_input) if enabled else None
    token = _CURRENT.set(None if mask is None else mask != 0)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Tensor | None:
    """The (B, T) bool mask of real tokens of the batch now running, or None."""
    return _CURRENT.get()


def row_weights(x: Tensor, mask: Tensor | None) -> Tensor | None:
    """(B*T,) 0/1 weights, on ``x``'s device and in its dtype, of the (b, t) rows of ``x`` (B, T, ..., C) when
    ``mask`` is (B, T); None (every row counts) for any other shape or no mask."""
    if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return None
    return mask.reshape(-1).to(x.device, x.dtype)


def sum_but_last(values: Tensor, weights: Tensor | None) -> Tensor:
    """float64 (C,) sum of ``values`` (..., C) over every dim but the last, each (b, t) row
    weighted by ``weights`` (:func:`row_weights`) when given."""
    channels = values.shape[-1]
    if weights is None:
        return values.reshape(-1, channels).sum(0).double()
    return (weights @ values.reshape(weights.shape[0], -1)).reshape(-1, channels).sum(0).double()


def rows_counted(x: Tensor, weights: Tensor | None) -> float | Tensor:
    """The rows (entries of every dim but the last) of ``x`` that count: a number, or with
    ``weights`` a 0-dim float64 tensor on ``x``'s device (no host synchronisation)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if weights is None:
        return float(rows)
    return weights.sum(dtype=torch.float64) * (rows // max(weights.shape[0], 1))
