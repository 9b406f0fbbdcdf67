"""Holding, applying, saving and making permanent the pruning masks.

Weights and biases are masked with PyTorch's own pruning reparametrisation
(``torch.nn.utils.prune``: a ``<name>_orig`` parameter, a ``<name>_mask`` buffer and a
forward pre-hook computing ``<name> = <name>_orig * <name>_mask``), so gradients, weight
decay and momentum can never revive a pruned entry, and the masks travel in
``state_dict``. Shortcut paths masked by the residual rule get a ``nnrelief_gate`` buffer
and a forward hook multiplying the module's output channels by it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from torch import Tensor

GATE = "nnrelief_gate"
_GATE_HOOK = "_nnrelief_gate_hook"


class StateDictMismatchError(ValueError):
    """A state dict that does not fit a model: its keys of other shapes, its missing and its
    unexpected keys (all of them in the attributes). The message is short: a headline with the
    counts, then one line per kind naming the first few keys (:attr:`details`)."""

    SHOWN = 3  # keys named per kind

    def __init__(self, subject: str, shapes: list[str], missing: list[str], unexpected: list[str], remedy: str = "") -> None:
        self.subject, self.remedy = subject, remedy
        self.shapes, self.missing, self.unexpected = list(shapes), list(missing), list(unexpected)
        super().__init__("\n".join([self.headline, *(f"  {line}" for line in self.details)]))

    def within(self, subject: str, remedy: str) -> StateDictMismatchError:
        """The same differences, told about ``subject`` (e.g. the file) with a ``remedy``."""
        return StateDictMismatchError(subject, self.shapes, self.missing, self.unexpected, remedy)

    @property
    def headline(self) -> str:
        """One line: what does not fit, the counts, the remedy."""
        counts = [f"{len(keys)} keys {what}" for keys, what in ((self.shapes, "of other shapes"), (self.missing, "missing"),
                                                                 (self.unexpected, "not in the model")) if keys]  # fmt: skip
        return f"{self.subject} (model left unchanged): {', '.join(counts)}" + (f"; {self.remedy}" if self.remedy else "")

    @property
    def details(self) -> list[str]:
        """One line per kind of difference, naming its first :attr:`SHOWN` keys."""
        kinds = (("other shapes", self.shapes, "; "), ("missing from the checkpoint", self.missing, ", "),
                 ("not in the model", self.unexpected, ", "))  # fmt: skip
        return [f"{what}: {sep.join(keys[: self.SHOWN])}" + (f" (+{len(keys) - self.SHOWN} more)" if len(keys) > self.SHOWN else "")
                for what, keys, sep in kinds if keys]  # fmt: skip


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is under a pruning mask."""
    return prune.is_pruned(module) and hasattr(module, f"{name}_mask")


def current_mask(module: nn.Module, name: str = "weight") -> Tensor | None:
    """The full-shape boolean mask of ``module.<name>``, all True if unmasked, None if absent."""
    if is_masked(module, name):
        return getattr(module, f"{name}_mask").bool()
    tensor = getattr(module, name, None)
    return None if tensor is None else torch.ones_like(tensor, dtype=torch.bool)


def set_mask(module: nn.Module, name: str, keep: Tensor) -> None:
    """Mask ``module.<name>`` with ``keep`` ANDed with any existing mask (never revives)."""
    keep = keep.to(device=getattr(module, name).device)
    if is_masked(module, name):
        mask = getattr(module, f"{name}_mask")
        mask.mul_(keep.to(mask.dtype))
    else:
        prune.custom_from_mask(module, name, keep.to(getattr(module, name).dtype))
        mask = getattr(module, f"{name}_mask")
    original = getattr(module, f"{name}_orig")
    with torch.no_grad():  # the pre-hook recomputes the effective tensor with autograd
        original.mul_(mask)
        setattr(module, name, original * mask)


def _gate_hook(module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
    gate = getattr(module, GATE)
    shape = [1, -1] + [1] * (output.dim() - 2)
    return output * gate.view(shape).to(output.dtype)


def set_gate(module: nn.Module, keep: Tensor, like: Tensor | None = None) -> None:
    """Mask the output channels of ``module`` (a shortcut path) with ``keep`` (never revives).

    A new gate buffer takes the device and floating dtype of ``like`` (the weights of the
    model it belongs to; a shortcut module may have none of its own), else of ``keep``'s
    device and the default dtype. An existing gate keeps its device and dtype.
    """
    if hasattr(module, GATE):
        gate = getattr(module, GATE)
        gate.mul_(keep.to(device=gate.device, dtype=gate.dtype))
    else:
        if like is None:
            like = torch.empty(0, device=keep.device)
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        module.register_buffer(GATE, keep.to(device=like.device, dtype=dtype, copy=True))
    if not hasattr(module, _GATE_HOOK):
        setattr(module, _GATE_HOOK, module.register_forward_hook(_gate_hook))


def model_weights(model: nn.Module) -> Tensor | None:
    """The first floating parameter of ``model`` (whose device and dtype new nnrelief
    buffers follow), or None if it has none."""
    return next((p for p in model.parameters() if p.is_floating_point()), None)


def gate_of(module: nn.Module) -> Tensor | None:
    """The boolean channel gate of ``module``, or None."""
    gate = getattr(module, GATE, None)
    return None if gate is None else gate.bool()


def restore_masks(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
    """Load a pruned model's ``state_dict`` into a freshly built model of the same class.

    Re-creates the masks (``*_orig`` / ``*_mask`` entries) and shortcut gates found in the
    state dict, then loads every value. Use it instead of ``model.load_state_dict`` for
    checkpoints saved after ``nnrelief.prune``. All or nothing: a state dict that does not
    fit (missing or unexpected keys with ``strict``, other shapes) raises ``ValueError``
    listing every difference, and ``model`` is left unchanged; so do masks or gates holding
    anything but 0 and 1 (a 0.5 or a NaN: a damaged or foreign file).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"restore_masks needs a state dict (a mapping of names to tensors, as torch.load of a saved "
            f"model gives), got {type(state_dict).__name__}"
        )
    _check_binary(state_dict)
    modules = dict(model.named_modules())
    masked, gated = [], []
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        module = modules.get(prefix)
        if module is None:
            continue
        if leaf.endswith("_mask") and not is_masked(module, leaf[: -len("_mask")]):
            name = leaf[: -len("_mask")]
            if isinstance(getattr(module, name, None), Tensor):
                masked.append((module, name))
        elif leaf == GATE and not hasattr(module, GATE):
            gated.append((module, key, value))
    _check_fits(model, state_dict, masked, {key: value.shape for _, key, value in gated}, strict)
    for module, name in masked:
        prune.custom_from_mask(module, name, torch.ones_like(getattr(module, name)))
    weights = model_weights(model)
    for module, _, value in gated:
        set_gate(module, torch.ones(value.shape, dtype=torch.bool), value if weights is None else weights)
    model.load_state_dict(state_dict, strict=strict)
    refresh_masked(model)


def _check_binary(state_dict: Mapping[str, Any]) -> None:
    """Refuse mask and gate entries other than 0 and 1, naming them."""
    bad = [
        key for key, value in state_dict.items()
        if (key.endswith("_mask") or key.rpartition(".")[2] == GATE) and isinstance(value, Tensor)
        and value.is_floating_point() and not bool(((value == 0) | (value == 1)).all())
    ]  # fmt: skip
    if bad:
        raise ValueError(
            f"masks must hold only 0 and 1, but {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} hold other values "
            "(a damaged or foreign file); the model was left unchanged"
        )


def _check_fits(
    model: nn.Module, state_dict: Mapping[str, Tensor], masked: list[tuple[nn.Module, str]],
    gates: dict[str, torch.Size], strict: bool,
) -> None:  # fmt: skip
    """Compare ``state_dict`` with the keys and shapes ``model`` will have once the ``masked``
    tensors are masked and the ``gates`` added."""
    owner = {id(module): prefix for prefix, module in model.named_modules()}
    renamed = {f"{owner[id(module)]}.{name}".lstrip("."): name for module, name in masked}
    expected: dict[str, torch.Size] = dict(gates)
    for key, value in model.state_dict().items():
        if key in renamed:
            expected[f"{key}_orig"] = expected[f"{key}_mask"] = value.shape
        else:
            expected[key] = value.shape
    shapes = [f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key])}"
              for key, value in state_dict.items() if key in expected and value.shape != expected[key]]  # fmt: skip
    missing = [key for key in expected if key not in state_dict] if strict else []
    unexpected = [key for key in state_dict if key not in expected] if strict else []
    if shapes or missing or unexpected:
        raise StateDictMismatchError(f"the state dict does not fit {type(model).__name__}", shapes, missing, unexpected)


def refresh_masked(model: nn.Module) -> None:
    """Recompute every masked ``.weight``/``.bias`` now (not only at the next forward)."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                names = [h._tensor_name for h in hook] if isinstance(hook, prune.PruningContainer) else [hook._tensor_name]
                with torch.no_grad():
                    for name in names:
                        setattr(module, name, getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask"))


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold all masks into plain parameters and remove every hook nnrelief added.

    Afterwards the model is an ordinary ``nn.Module`` (plain ``weight``/``bias``
    parameters with zeros where pruned). Shortcut gates that still mask a channel stay as
    buffers with their hook, since the identity path has no weight to fold them into.
    Returns ``model``.
    """
    for module in model.modules():
        for name in ("weight", "bias"):
            if is_masked(module, name):
                prune.remove(module, name)
        gate = gate_of(module)
        if gate is not None and bool(gate.all()):
            getattr(module, _GATE_HOOK).remove()
            delattr(module, _GATE_HOOK)
            del module._buffers[GATE]
    return model
