"""Language-model metrics from a mean cross-entropy in nats per token (byte tokens: the
bits per token are the bits per byte)."""

from __future__ import annotations

import math

_LARGEST_EXP = math.log(float.fromhex("0x1.fffffffffffffp+1023"))


def bits_per_token(loss: float) -> float:
    """Mean cross-entropy ``loss`` (nats per token) in bits per token."""
    return loss / math.log(2.0)


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean cross-entropy in nats per token (``inf`` beyond floats)."""
    return math.exp(loss) if loss <= _LARGEST_EXP else math.inf
