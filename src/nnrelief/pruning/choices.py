"""Which layers a pass prunes, with which alpha, and the alpha that reaches a target size.

Pure helpers of :func:`nnrelief.prune`'s ``ignore=``, ``only=``, ``alphas=`` and ``target=``:
layer names match glob patterns (``fnmatch``: ``"features.0"``, ``"*.mlp.*"``) or module
types (``nn.Embedding``, ``transformers.pytorch_utils.Conv1D``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

import torch.nn as nn

from .selection import check_alpha

Selector = str | type
"""A layer name pattern or a module type."""


def check_selectors(selectors: Iterable[Selector] | Selector | None, name: str) -> list[Selector]:
    """``selectors`` as a list (one pattern or type alone is a list of one); refuses other items."""
    if selectors is None:
        return []
    items = [selectors] if isinstance(selectors, (str, type)) else list(selectors)
    for item in items:
        if not isinstance(item, (str, type)):
            raise TypeError(f"{name} takes layer name patterns (str) or module types, got {item!r} ({type(item).__name__})")
    return items


def matches(name: str, module: nn.Module, selectors: list[Selector]) -> bool:
    """Whether the layer ``name`` (``module``) is one of ``selectors``."""
    return any(fnmatchcase(name, item) if isinstance(item, str) else isinstance(module, item) for item in selectors)


def spared_layers(layers: Mapping[str, nn.Module], ignore: list[Selector], only: list[Selector]) -> set[str]:
    """Layers a pass leaves whole: those matching ``ignore`` and, when ``only`` is given, those not matching it."""
    return {
        name for name, module in layers.items()
        if matches(name, module, ignore) or (only and not matches(name, module, only))
    }  # fmt: skip


def check_alphas(alphas: Mapping[str, float] | None) -> dict[str, float]:
    """``alphas`` (layer name pattern -> alpha) with every alpha checked, the key named."""
    if alphas is None:
        return {}
    if not isinstance(alphas, Mapping):
        raise TypeError(f"alphas maps layer name patterns to alphas (e.g. {{'classifier': 0.99}}), got {type(alphas).__name__}")
    checked = {}
    for pattern, alpha in alphas.items():
        if not isinstance(pattern, str):
            raise TypeError(f"alphas takes layer name patterns (str) as keys, got {pattern!r} ({type(pattern).__name__})")
        try:
            float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alphas[{pattern!r}] must be a number in (0, 1], got {alpha!r}") from None
        checked[pattern] = check_alpha(alpha, f"alphas[{pattern!r}]")
    return checked


def check_choices_match(
    model: nn.Module, layers: Iterable[str], ignore: list[Selector], only: list[Selector], alphas: Mapping[str, float]
) -> None:
    """Raise ``ValueError`` naming the first name pattern of ``ignore``, ``only`` or
    ``alphas`` that matches none of the prunable ``layers``, or module type that ``model``
    does not contain (as the command line refuses them)."""
    names = list(layers)
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    types = {type(module) for module in model.modules()}
    for choice, selectors in (("ignore", ignore), ("only", only), ("alphas", list(alphas))):
        for item in selectors:
            if isinstance(item, str) and not any(fnmatchcase(name, item) for name in names):
                raise ValueError(f"{choice}=: pattern {item!r} matches no prunable layer of {type(model).__name__} "
                                 f"({shown})")  # fmt: skip
            if isinstance(item, type) and not any(issubclass(kind, item) for kind in types):
                raise ValueError(f"{choice}=: {type(model).__name__} has no module of type {item.__name__}")


def alpha_for(name: str, kind: str, alphas: Mapping[str, float], alpha_fc: float, alpha_conv: float) -> float:
    """The alpha of one layer: the first pattern of ``alphas`` it matches, else by its kind."""
    for pattern, alpha in alphas.items():
        if fnmatchcase(name, pattern):
            return alpha
    return alpha_fc if kind == "linear" else alpha_conv


def check_target(target: Any) -> float | None:
    """``target`` (remaining fraction) as a float in (0, 1], or None."""
    if target is None:
        return None
    value = float(target)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"target is the fraction of the scored weights and biases to keep, in (0, 1]; got {target!r}")
    return value


def parse_nm(text: str) -> tuple[int, int]:
    """``"N:M"`` (e.g. ``"2:4"``) as the pair (n, m) of ``nm=``; a ValueError saying the form otherwise."""
    n, sep, m = str(text).partition(":")
    if sep and n.strip().isdigit() and m.strip().isdigit() and 0 < int(n) < int(m):
        return int(n), int(m)
    raise ValueError(f"nm is written N:M with whole numbers 0 < N < M (N of every M consecutive inputs kept), e.g. 2:4; got {text!r}")


class UnreachableTargetError(ValueError):
    """``target=`` above the fraction the pruned layers still hold (``remaining``): a pass
    never restores weights."""

    def __init__(self, target: float, remaining: float) -> None:
        super().__init__(f"target={target:g} cannot be reached: the pruned layers already keep only {remaining:.4g} of "
                         "their weights and biases (target is a fraction of the dense layers, and a pass never "
                         f"restores weights); give a target below {remaining:.4g}, e.g. {remaining * 0.5:.4g} to halve "
                         "what is left")  # fmt: skip
        self.target, self.remaining = target, remaining


def find_alpha(remaining: Callable[[float], float], target: float, steps: int = 24) -> float:
    """The alpha in (0, 1] whose ``remaining(alpha)`` (non-decreasing in alpha) comes closest
    to ``target``: bisection, then the nearer of the two bracketing alphas."""
    low, high = 0.0, 1.0
    if remaining(high) <= target:
        return high
    for _ in range(steps):
        middle = (low + high) / 2
        if remaining(middle) < target:
            low = middle
        else:
            high = middle
    if low == 0.0:
        return high
    return low if abs(remaining(low) - target) < abs(remaining(high) - target) else high


def iteration_target(per_pass: float, iteration: int) -> float:
    """The remaining fraction iteration ``iteration`` (1, 2, ...) prunes to when each pass
    keeps ``per_pass`` of what the previous one left: ``per_pass ** iteration``."""
    if iteration < 1:
        raise ValueError(f"iterations are counted from 1, got {iteration}")
    return check_target(per_pass) ** iteration


def unmatched_patterns(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The name patterns of ``patterns`` that match none of ``names``."""
    names = list(names)
    return [pattern for pattern in patterns if not any(fnmatchcase(name, pattern) for name in names)]
