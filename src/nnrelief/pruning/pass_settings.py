"""The settings of an NNrelief pass, declared once with their defaults: :class:`PassSettings`,
taken by :func:`nnrelief.prune` (built from its keywords), by
:func:`nnrelief.relieve` for every pass of a run and by the experiment config
(:meth:`~nnrelief.experiments.config.ExperimentConfig.pass_settings`). A new pass setting
is one more field here (and, for experiments, one more config field)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .choices import Selector, alpha_for, check_alphas, check_selectors, check_target, iteration_target
from .selection import check_alpha, check_nm

SCORE_MODES = ("paper", "authors")
TARGET_SCOPES = ("model", "layer")


@dataclass(frozen=True)
class PassSettings:
    """What one pass prunes and how much; checked when made.

    Attributes:
        alpha_fc: fraction of each neuron's signal kept in linear layers.
        alpha_conv: fraction of each filter's signal kept in conv layers.
        score: the conv score, ``"paper"`` (the paper's formula) or ``"authors"`` (the authors' code).
        ignore: layers the pass leaves whole (name glob patterns or module types).
        only: prune only the layers matching these.
        alphas: name pattern -> alpha of the matching layers, first match wins.
        target: the remaining fraction of the scored weights to reach with one alpha for
            every layer. In :func:`nnrelief.relieve` (and ``target_remaining`` of an
            experiment) each pass keeps this fraction of what the previous one left:
            iteration k's pass reaches ``target ** k`` (:meth:`at_iteration`).
        target_scope: ``"model"`` (one alpha for every layer, the scored layers together
            reach ``target``) or ``"layer"`` (each layer its own alpha, found so that every
            layer reaches ``target`` alone, as Wanda prunes every layer alike).
        nm: (n, m) for N:M sparsity instead of the alpha rule: per output neuron, each group
            of m consecutive inputs keeps its n connections of highest score (convs: n of m
            consecutive input channels' kernels). Not combined with ``target``, ``alphas``
            or other alphas than the defaults (the residual rule uses ``alpha_conv``).
        skip_padding: leave the padding positions of batches holding an ``attention_mask``
            (B, T) out of the statistics over token positions (:mod:`nnrelief.tokens`).
    """

    alpha_fc: float = 0.95
    alpha_conv: float = 0.9
    score: str = "paper"
    ignore: Iterable[Selector] | Selector | None = ()
    only: Iterable[Selector] | Selector | None = ()
    alphas: Mapping[str, float] | None = field(default_factory=dict)
    target: float | None = None
    target_scope: str = "model"
    nm: tuple[int, int] | None = None
    skip_padding: bool = True

    def __post_init__(self) -> None:
        checked = {
            "alpha_fc": check_alpha(self.alpha_fc, "alpha_fc"), "alpha_conv": check_alpha(self.alpha_conv, "alpha_conv"),
            "ignore": tuple(check_selectors(self.ignore, "ignore")), "only": tuple(check_selectors(self.only, "only")),
            "alphas": check_alphas(self.alphas), "target": check_target(self.target),
            "nm": None if self.nm is None else check_nm(self.nm),
        }  # fmt: skip
        if self.score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {self.score!r}")
        if self.target_scope not in TARGET_SCOPES:
            raise ValueError(f"target_scope must be one of {TARGET_SCOPES}, got {self.target_scope!r}")
        if self.target_scope != "model" and self.target is None:
            raise ValueError(f"target_scope={self.target_scope!r} needs a target (the remaining fraction each layer reaches)")
        _check_nm_alone(checked)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def alpha_of(self, name: str, family: str) -> float:
        """The alpha of layer ``name`` of ``family`` ("linear" or "conv"): the first pattern of
        :attr:`alphas` it matches, else :attr:`alpha_fc` / :attr:`alpha_conv`."""
        return alpha_for(name, family, self.alphas, self.alpha_fc, self.alpha_conv)

    def at_iteration(self, iteration: int) -> PassSettings:
        """The settings of iteration ``iteration``'s pass of a run: :attr:`target` ``** iteration``."""
        return self if self.target is None else dataclasses.replace(self, target=iteration_target(self.target, iteration))

    def keywords(self) -> dict[str, Any]:
        """The keyword arguments of :func:`nnrelief.prune` that make these settings."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}

    def loop_settings(self) -> dict[str, Any]:
        """As stored with a run's loop state: the alphas and the score, and the choices made
        only (loop states written before the choices existed resume)."""
        chosen = {"ignore": [str(s) for s in self.ignore], "only": [str(s) for s in self.only], "alphas": dict(self.alphas),
                  "target_remaining": self.target, "target_scope": None if self.target_scope == "model" else self.target_scope,
                  "nm": None if self.nm is None else list(self.nm), "skip_padding": None if self.skip_padding else False}  # fmt: skip
        made = {name: value for name, value in chosen.items() if value not in ([], {}, None)}
        return {"alpha_fc": self.alpha_fc, "alpha_conv": self.alpha_conv, "score": self.score, **made}


def _check_nm_alone(checked: dict[str, Any]) -> None:
    """Refuse ``nm`` together with a setting of the alpha rule it replaces."""
    if checked["nm"] is None:
        return
    alpha_rule = {"target": None, "alphas": {}, "alpha_fc": PassSettings.alpha_fc, "alpha_conv": PassSettings.alpha_conv}
    given = [f"{name}={checked[name]!r}" for name, default in alpha_rule.items() if checked[name] != default]
    if given:
        raise ValueError(f"nm={checked['nm']} replaces the alpha rule (each group of m inputs keeps its n best connections): "
                         f"leave out {', '.join(given)}")  # fmt: skip


DEFAULTS = PassSettings()
"""The default settings (what :func:`nnrelief.prune` uses when given no keywords)."""
