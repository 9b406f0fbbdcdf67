"""Holding, applying, saving and making permanent the pruning masks.

A pruned tensor (a layer's weight or bias, a BatchNorm's scale or shift) stays an ordinary
parameter, its pruned entries zeroed in place; beside it a boolean buffer ``<name>_mask``
(one byte per entry, kept out of ``state_dict``) marks the entries kept. The forward is the
module's own, and ``model.state_dict()`` is the plain model's: it loads, zeros included,
into a fresh instance of the class (``load_state_dict(strict=True)``, Hugging Face
``save_pretrained``/``from_pretrained``). What keeps pruned entries at zero through training
(:func:`hold_masks`):

* a gradient hook on the parameter zeroes their gradients, so ``clip_grad_norm_``, DDP's
  all-reduce and the optimizer's moments see nothing there;
* after every ``torch.optim`` step (a global step post-hook) they are zeroed again, so SGD
  momentum or Adam moments gathered before the pass and weight decay cannot revive them.

Masks travel in nnrelief's own files as ``<name>_mask`` entries beside the weights
(:func:`state_with_masks`); :func:`restore_masks` reads those, today's and earlier
(``<name>_orig`` / float ``<name>_mask``, torch.nn.utils.prune's) formats, or infers the masks
from the zeros of a plain state dict. Shortcut paths masked by the residual rule get a
``nnrelief_gate`` buffer (in ``state_dict``: the identity path has no weight to hold it) and
a forward hook multiplying the module's output channels by it.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook

from ..analysis.layers import prunable_kind, weight_matrix

GATE = "nnrelief_gate"
MASK = "_mask"  # suffix of a mask buffer and of its state-dict entry
_GATE_HOOK = "_nnrelief_gate_hook"
ORIG = "_orig"  # torch.nn.utils.prune's name for the masked parameter (earlier nnrelief files)


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


# --- holding: what keeps pruned entries at zero ------------------------------------------------

_HELD: dict[int, tuple[weakref.ref, weakref.ref, str, Any]] = {}  # id(param) -> (param, owner module, name, grad hook)
_STEP_HOOK: list[Any] = []  # the one global optimizer step post-hook, once registered


def _mask_of(module: nn.Module, name: str) -> Tensor | None:
    mask = module._buffers.get(name + MASK)
    return mask if isinstance(mask, Tensor) and mask.dtype == torch.bool else None


def _held_mask(param: Tensor) -> Tensor | None:
    """The mask holding ``param``, if it is held (its module still alive and masked)."""
    entry = _HELD.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    owner = entry[1]()
    return None if owner is None else _mask_of(owner, entry[2])


class _MaskGradient:
    """Gradient hook: zero the gradient of pruned entries (reads the module's current mask,
    so ``.to(device)`` and further pruning are followed)."""

    def __init__(self, param: Tensor) -> None:
        self.param = weakref.ref(param)

    def __call__(self, grad: Tensor) -> Tensor:
        param = self.param()
        mask = None if param is None else _held_mask(param)
        return grad if mask is None else torch.where(mask, grad, 0)


@torch.compiler.disable  # a compiled step runs it eagerly after the graph (it reads Python state)
def _rezero_after_step(optimizer: Optimizer, _args: Any, _kwargs: Any) -> None:
    """Global optimizer step post-hook: zero the pruned entries of the held parameters the
    optimizer just stepped (nothing else is touched; no host sync)."""
    if not _HELD:
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                mask = _held_mask(param)
                if mask is not None:
                    param.masked_fill_(~mask, 0)


def _hold(module: nn.Module, name: str) -> None:
    """Hold ``module.<name>`` (a parameter with a mask buffer) at zero where masked; idempotent."""
    param = module._parameters.get(name)
    if param is None or _held_mask(param) is not None:
        return
    key = id(param)
    entry = _HELD.get(key)
    if entry is not None and entry[3] is not None:
        entry[3].remove()  # a dead or replaced entry under a reused id
    hook = param.register_hook(_MaskGradient(param)) if param.requires_grad else None
    _HELD[key] = (weakref.ref(param, lambda _ref, key=key: _HELD.pop(key, None)), weakref.ref(module), name, hook)
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_post_hook(_rezero_after_step))


def _release(module: nn.Module, name: str) -> None:
    param = module._parameters.get(name)
    entry = None if param is None else _HELD.get(id(param))
    if entry is not None and entry[0]() is param and entry[1]() is module:  # not a copy sharing the parameter
        if entry[3] is not None:
            entry[3].remove()
        del _HELD[id(param)]


def hold_masks(model: nn.Module) -> nn.Module:
    """Make every mask of ``model`` hold through training (gradient hooks and the optimizer
    step hook) and zero the masked entries now. Masks set by nnrelief are held already; a
    model copied with ``copy.deepcopy`` or unpickled whole carries its masks (buffers) but not
    the hooks, so call this on the copy before training it. Returns ``model``."""
    for module in model.modules():
        for name in list(module._parameters):
            mask = _mask_of(module, name)
            if mask is not None:
                with torch.no_grad():
                    module._parameters[name].masked_fill_(~mask, 0)
                _hold(module, name)
    return model


# --- setting and reading masks ----------------------------------------------------------------


def is_mask_buffer(module: nn.Module, name: str) -> bool:
    """Whether buffer ``name`` of ``module`` is the mask of one of its parameters."""
    return name.endswith(MASK) and name[: -len(MASK)] in module._parameters and _mask_of(module, name[: -len(MASK)]) is not None


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is under a pruning mask."""
    return _mask_of(module, name) is not None


def current_mask(module: nn.Module, name: str = "weight") -> Tensor | None:
    """The full-shape boolean mask of ``module.<name>`` (the module's own buffer: read it, do
    not modify it), all True if unmasked, None if absent."""
    mask = _mask_of(module, name)
    if mask is not None:
        return mask
    tensor = getattr(module, name, None)
    return None if tensor is None else torch.ones_like(tensor, dtype=torch.bool)


def set_mask(module: nn.Module, name: str, keep: Tensor, adopt: bool = False) -> None:
    """Mask ``module.<name>`` with ``keep`` ANDed with any existing mask (never revives):
    the pruned entries are zeroed in place and held at zero (see :func:`hold_masks`). With
    ``adopt`` a first mask that already is a boolean tensor of the parameter's shape and
    device becomes the mask buffer itself (no copy: the caller lets go of it)."""
    param = module._parameters.get(name)
    if param is None:
        raise TypeError(f"{type(module).__name__}.{name} is not a parameter of its module: nnrelief masks parameters only")
    mask = _mask_of(module, name)
    if mask is None:
        fits = keep.dtype == torch.bool and keep.shape == param.shape and keep.device == param.device and keep.is_contiguous()
        mask = keep if adopt and fits else torch.empty_like(param, dtype=torch.bool).copy_(keep)
        module.register_buffer(name + MASK, mask, persistent=False)
    else:
        mask.logical_and_(keep.to(mask.device))
    with torch.no_grad():
        param.masked_fill_(~mask, 0)
    _hold(module, name)


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


# --- state dicts ------------------------------------------------------------------------------


def state_with_masks(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` plus a ``<name>_mask`` entry (bool) per mask: what nnrelief's
    own files hold, so :func:`restore_masks` brings back exactly these masks."""
    state = model.state_dict()
    for prefix, module in model.named_modules():
        for name in list(module._parameters):
            mask = _mask_of(module, name)
            if mask is not None:
                state[f"{prefix}.{name}{MASK}".lstrip(".")] = mask
    return state


def restore_masks(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True, infer: bool = True) -> None:
    """Load a pruned model's state dict into a model of the same class, with its masks (they
    replace any the model has).

    The masks come from the state dict's ``<name>_mask`` entries (nnrelief's files: see
    :func:`state_with_masks`; files of earlier versions, with ``<name>_orig`` and float masks,
    load too). A plain state dict (``model.state_dict()`` of a pruned model, a Hugging Face
    checkpoint) has none: with ``infer`` they are read off its zeros (every zero weight of a
    layer nnrelief prunes; a bias only where its neuron has no weight left; a BatchNorm channel
    where scale and shift are both zero), so a zero-initialised bias is left free.
    All or nothing: a state dict that does not fit (missing or unexpected keys with
    ``strict``, other shapes) raises ``ValueError`` listing every difference, and ``model`` is
    left unchanged; so do masks or gates holding anything but 0 and 1.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"restore_masks needs a state dict (a mapping of names to tensors, as torch.load of a saved "
            f"model gives), got {type(state_dict).__name__}"
        )
    _check_binary(state_dict)
    plain, masks = split_masks(state_dict)
    modules = dict(model.named_modules())
    gated = []
    for key, value in plain.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == GATE and prefix in modules and not hasattr(modules[prefix], GATE):
            gated.append((modules[prefix], key, value))
    _check_fits(model, plain, masks, {key: value.shape for _, key, value in gated}, strict)
    weights = model_weights(model)
    for module, _, value in gated:
        set_gate(module, torch.ones(value.shape, dtype=torch.bool), value if weights is None else weights)
    model.load_state_dict(plain, strict=strict)
    if not masks and infer:
        masks = _masks_from_zeros(model)
    if masks:
        _drop_masks(model)  # the state dict's masks replace the model's
    for key, keep in masks.items():
        prefix, _, leaf = key.rpartition(".")
        set_mask(modules[prefix], leaf[: -len(MASK)], keep)


def split_masks(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(plain state dict, ``<name>_mask`` -> bool mask) of a state dict in any of nnrelief's
    formats: earlier files' ``<name>_orig`` (times its mask) becomes ``<name>``."""
    plain: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(ORIG) and f"{key[: -len(ORIG)]}{MASK}" in state_dict:
            base = key[: -len(ORIG)]
            plain[base] = value * state_dict[base + MASK].to(value.dtype)
        elif _is_mask_entry(state_dict, key):
            masks[key] = value.bool()
        else:
            plain[key] = value
    return plain, masks


def _is_mask_entry(state_dict: Mapping[str, Any], key: str) -> bool:
    """Whether ``key`` is a mask (a ``<name>_mask`` tensor beside its ``<name>`` or
    ``<name>_orig`` of the same shape), not a buffer of the model that happens to end so."""
    value = state_dict[key]
    if not key.endswith(MASK) or not isinstance(value, Tensor):
        return False
    base = key[: -len(MASK)]
    masked = state_dict.get(base, state_dict.get(base + ORIG))
    return isinstance(masked, Tensor) and masked.shape == value.shape


def _masks_from_zeros(model: nn.Module) -> dict[str, Tensor]:
    """Masks read off a plain state dict's zeros, erring towards masking less: every zero
    weight of a layer nnrelief prunes; a bias only where its neuron has no weight left (a
    zero-initialised bias is not a pruned one); a BatchNorm channel where scale and shift
    are both zero (nnrelief removes them together)."""
    masks = {}

    def add(prefix: str, name: str, keep: Tensor) -> None:
        if not bool(keep.all()):
            masks[f"{prefix}.{name}{MASK}".lstrip(".")] = keep

    for prefix, module in model.named_modules():
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        if weight is None or not weight.is_floating_point():
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and bias is not None:
            channel = (weight != 0) | (bias != 0)
            add(prefix, "weight", channel)
            add(prefix, "bias", channel.clone())
        elif prunable_kind(module)[0] is not None:
            add(prefix, "weight", weight != 0)
            if bias is not None:
                add(prefix, "bias", (bias != 0) | weight_matrix(module).flatten(1).any(dim=1))
    return masks


def _check_binary(state_dict: Mapping[str, Any]) -> None:
    """Refuse mask and gate entries other than 0 and 1, naming them."""
    bad = [
        key for key, value in state_dict.items()
        if (_is_mask_entry(state_dict, key) or key.rpartition(".")[2] == GATE) and isinstance(value, Tensor)
        and value.is_floating_point() and not bool(((value == 0) | (value == 1)).all())
    ]  # fmt: skip
    if bad:
        raise ValueError(
            f"masks must hold only 0 and 1, but {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} hold other values "
            "(a damaged or foreign file); the model was left unchanged"
        )


def _check_fits(
    model: nn.Module, plain: Mapping[str, Tensor], masks: Mapping[str, Tensor], gates: dict[str, torch.Size], strict: bool
) -> None:
    """Compare the plain entries and the masks with the keys and shapes of ``model`` once the
    ``gates`` are added."""
    expected: dict[str, torch.Size] = dict(gates)
    expected.update({key: value.shape for key, value in model.state_dict().items()})
    shapes = [f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key])}"
              for key, value in plain.items() if key in expected and value.shape != expected[key]]  # fmt: skip
    params = {name: param.shape for name, param in model.named_parameters()}
    strays = [key for key in masks if key[: -len(MASK)] not in params]  # masks of what the model lacks
    shapes += [f"{key}: checkpoint {tuple(mask.shape)}, model {tuple(params[base])}" for key, mask in masks.items()
               if (base := key[: -len(MASK)]) in params and mask.shape != params[base] and plain.get(base, mask).shape == params[base]]
    missing = [key for key in expected if key not in plain] if strict else []
    unexpected = [key for key in plain if key not in expected] + strays if strict else []
    if shapes or missing or unexpected:
        raise StateDictMismatchError(f"the state dict does not fit {type(model).__name__}", shapes, missing, unexpected)


def _drop_masks(model: nn.Module) -> None:
    """Remove every mask buffer and its hold (the zeros stay)."""
    for module in model.modules():
        for name in list(module._parameters):
            if _mask_of(module, name) is not None:
                _release(module, name)
                del module._buffers[name + MASK]


def make_permanent(model: nn.Module) -> nn.Module:
    """Drop every mask and hook nnrelief added, keeping the zeros.

    Afterwards the model is an ordinary ``nn.Module`` (plain ``weight``/``bias`` parameters
    with zeros where pruned, free to train anywhere). Shortcut gates that still mask a
    channel stay as buffers with their hook, since the identity path has no weight to fold
    them into. Returns ``model``.
    """
    _drop_masks(model)
    for module in model.modules():
        gate = gate_of(module)
        if gate is not None and bool(gate.all()):
            getattr(module, _GATE_HOOK).remove()
            delattr(module, _GATE_HOOK)
            del module._buffers[GATE]
    return model
