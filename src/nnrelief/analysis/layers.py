"""The layers NNrelief scores, found on the module tree, and those it leaves alone (with why)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn
from torch import Tensor


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
    """A Linear (or transposed Conv1D) or Conv2d layer that NNrelief scores and masks.

    A layer called several times (a shared module) has several ``calls``; it is scored on
    the statistics of all of them pooled and cleaned only where every call agrees.
    """

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv"
    transposed: bool = False  # weight stored (in, out): a Hugging Face Conv1D (GPT-2)
    calls: list[LayerCall] = field(default_factory=list)
    batchnorm: str | None = None  # an affine BatchNorm reading this layer's output alone, in every call

    @property
    def structured(self) -> bool:
        """Whether structure cleaning applies: every call understood by the channel rules."""
        return bool(self.calls) and all(call.structured for call in self.calls)


def is_transposed_linear(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2): a Linear layer whose weight is stored (in, out)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, Tensor)
        and weight.dim() == 2 and weight.shape[1] == module.nf
    )


def kernel_layout(module: nn.Module, tensor: Tensor) -> Tensor:
    """``tensor`` (shaped like ``module.weight``) laid out (out, in / groups, *kernel): a
    Conv1D's transposed, a ConvTranspose2d's (in, out / groups, ...) regrouped."""
    if is_transposed_linear(module):
        return tensor.t()
    if isinstance(module, nn.ConvTranspose2d):
        groups, (inputs, per_group) = module.groups, tensor.shape[:2]
        laid = tensor.reshape(groups, inputs // groups, per_group, *tensor.shape[2:]).transpose(1, 2)
        return laid.reshape(groups * per_group, inputs // groups, *tensor.shape[2:])
    return tensor


def module_layout(module: nn.Module, tensor: Tensor) -> Tensor:
    """The inverse of :func:`kernel_layout`: back to ``module.weight``'s own layout."""
    if is_transposed_linear(module):
        return tensor.t()
    if isinstance(module, nn.ConvTranspose2d):
        groups, (outputs, per_group) = module.groups, tensor.shape[:2]
        laid = tensor.reshape(groups, outputs // groups, per_group, *tensor.shape[2:]).transpose(1, 2)
        return laid.reshape(groups * per_group, outputs // groups, *tensor.shape[2:])
    return tensor


def weight_matrix(module: nn.Module) -> Tensor:
    """The layer's weight laid out (out, in / groups, *kernel) (:func:`kernel_layout`)."""
    return kernel_layout(module, module.weight)


_SCORED_CONVS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)
_UNSCORED = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d, nn.Bilinear)


def prunable_kind(module: nn.Module) -> tuple[str | None, str | None]:
    """('linear'|'conv', None) for a scorable layer, (None, reason) for a layer with weights
    that NNrelief cannot score, (None, None) for anything else."""
    if nn.utils.parametrize.is_parametrized(module, "weight"):
        return None, (f"its weight is computed by a parametrization ({_parametrizations(module)}): left whole; "
                      "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') makes it prunable")  # fmt: skip
    if _weight_not_own(module):
        return None, ("its weight is not a parameter of its own (computed by a hook, e.g. torch.nn.utils.weight_norm, "
                      "or torch.nn.utils.prune's reparametrisation: torch.nn.utils.prune.remove(module, 'weight') makes "
                      "it prunable): left whole")  # fmt: skip
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return "linear", None
    if isinstance(module, _SCORED_CONVS) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return "conv", None
    if isinstance(module, _UNSCORED):
        return None, f"{type(module).__name__} is not scored (only Linear, Conv1d, Conv2d and ConvTranspose2d are)"
    if isinstance(module, nn.RNNBase):
        return None, f"{type(module).__name__} weights are not scored (recurrent layers are left whole)"
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        return None, "in_proj_weight (packed query/key/value projection) is not scored; out_proj is"
    return None, None


def _weight_not_own(module: nn.Module) -> bool:
    """A Linear/conv whose ``weight`` is not its own parameter."""
    if not isinstance(module, (nn.Linear, *_SCORED_CONVS)) or isinstance(module, nn.modules.lazy.LazyModuleMixin):
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
