"""The layers NNrelief scores, found on the module tree, and those it leaves alone (with why)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn
from torch import Tensor

from ..kinds import kind_of, unscored_reason


@dataclass
class LayerCall:
    """One call of a layer in the captured forward: its output node, the node it reads
    (the input where it enters the layer's module), the last node of the channel-wise chain
    after it (the post-activation output) and whether the channel rules understand it."""

    node: str
    input_node: str
    structured: bool
    chain_end: str | None = None


@dataclass
class PrunableLayer:
    """A layer of a kind of :mod:`nnrelief.kinds` that NNrelief scores and masks (``kind`` is
    its family, ``"linear"`` or ``"conv"``).

    A layer called several times (a shared module) has several ``calls``; it is scored on
    the statistics of all of them pooled and cleaned only where every call agrees.
    """

    name: str
    module: nn.Module
    kind: str  # its family: "linear" or "conv"
    transposed: bool = False  # a Linear whose weight is stored (in, out): a Hugging Face Conv1D (GPT-2)
    calls: list[LayerCall] = field(default_factory=list)
    batchnorm: str | None = None  # an affine BatchNorm reading this layer's output alone, in every call

    @property
    def structured(self) -> bool:
        """Whether structure cleaning applies: every call understood by the channel rules."""
        return bool(self.calls) and all(call.structured for call in self.calls)


def is_transposed_linear(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2): a Linear layer whose weight is stored (in, out)."""
    kind = kind_of(module)
    return kind is not None and kind.family == "linear" and kind.transposed


def kernel_layout(module: nn.Module, tensor: Tensor) -> Tensor:
    """``tensor`` (shaped like ``module.weight``) laid out (out, in / groups, *kernel), as its
    kind says (:meth:`nnrelief.kinds.LayerKind.kernel`)."""
    return kind_of(module).kernel(module, tensor)


def module_layout(module: nn.Module, tensor: Tensor) -> Tensor:
    """The inverse of :func:`kernel_layout`: back to ``module.weight``'s own layout."""
    return kind_of(module).stored(module, tensor)


def weight_matrix(module: nn.Module) -> Tensor:
    """The layer's weight laid out (out, in / groups, *kernel) (:func:`kernel_layout`)."""
    return kernel_layout(module, module.weight)


def prunable_kind(module: nn.Module) -> tuple[str | None, str | None]:
    """(its family 'linear' | 'conv', None) for a layer of a kind of :mod:`nnrelief.kinds`,
    (None, reason) for a layer with weights that NNrelief cannot score, (None, None) for anything else."""
    if nn.utils.parametrize.is_parametrized(module, "weight"):
        return None, (f"its weight is computed by a parametrization ({_parametrizations(module)}): left whole; "
                      "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') makes it prunable")  # fmt: skip
    if _weight_not_own(module):
        return None, ("its weight is not a parameter of its own (computed by a hook, e.g. torch.nn.utils.weight_norm, "
                      "or torch.nn.utils.prune's reparametrisation: torch.nn.utils.prune.remove(module, 'weight') makes "
                      "it prunable): left whole")  # fmt: skip
    kind = kind_of(module)
    return (kind.family, None) if kind is not None else (None, unscored_reason(module))


def _weight_not_own(module: nn.Module) -> bool:
    """A Linear/conv whose ``weight`` is not its own parameter."""
    if kind_of(module) is None or isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return False
    return "weight" not in module._parameters


def _parametrizations(module: nn.Module) -> str:
    return ", ".join(type(p).__name__ for p in module.parametrizations["weight"])


def find_layers(model: nn.Module) -> tuple[dict[str, PrunableLayer], dict[str, str]]:
    """All scorable layers by qualified name, and the skipped weighted layers with reasons."""
    layers: dict[str, PrunableLayer] = {}
    skipped: dict[str, str] = {}
    owners: dict[int, list[str]] = {}
    for qualified, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(qualified.rpartition(".")[0])
    for name, module in model.named_modules():
        kind, reason = prunable_kind(module)
        weight = getattr(module, "weight", None)
        tied = [owner for owner in owners.get(id(weight), []) if owner != name]
        if kind is not None and tied:
            skipped[name] = f"weight tied to {tied[0]} (e.g. an embedding): left unpruned"
        elif kind is not None:
            layers[name] = PrunableLayer(name, module, kind, transposed=is_transposed_linear(module))
        elif reason is not None:
            skipped[name] = reason
    return layers, skipped
