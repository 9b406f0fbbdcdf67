"""A pruned or compacted model's state, in a form a fresh instance of its own class takes back.

``state_dict(model)`` gives plain tensors and primitive values only (``torch.load(...,
weights_only=True)`` reads it): the model's state dict (with its masks, if it carries
nnrelief's), the class it came from, per module the shape attributes compaction may have
narrowed (``in_features``, ``out_channels``, ``num_features``, ...) and each
:class:`~nnrelief.compaction.narrowing.ChannelMap` that compaction wrapped around a module.
``load_state_dict(fresh, state)`` narrows ``fresh`` (the user's class, built as for
training) to those shapes: ChannelMaps wrapped in, new parameters and buffers of the
recorded shapes, attributes set; then loads the tensors strictly (masks and gates through
:func:`~nnrelief.pruning.masks.restore_masks`). All or nothing: whatever does not fit is
named and ``fresh`` is left as it was. The names follow Torch-Pruning's
``tp.state_dict``/``tp.load_state_dict``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..pruning.masks import GATE, StateDictMismatchError, restore_masks, split_masks, state_with_masks
from .narrowing import ChannelMap

log = logging.getLogger(__name__)

STATE_FORMAT = "nnrelief-state"
STATE_VERSION = 1
# Module attributes that describe tensor shapes (what narrowing sets, and their kin).
SHAPE_ATTRIBUTES = ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_features",
                    "normalized_shape", "nf", "nx", "num_embeddings", "embedding_dim")  # fmt: skip


_REMEDY = "give a fresh instance of the model the state was saved from"


class StateMismatchError(ValueError):
    """A state that does not fit the model given: :attr:`problem` says what, the message adds
    that the model is unchanged and the remedy."""

    def __init__(self, problem: str, remedy: str = _REMEDY) -> None:
        self.problem = problem
        super().__init__(f"{problem} (model left unchanged): {remedy}")


def class_name(model: nn.Module) -> str:
    """``module.qualname`` of ``model``'s class, as recorded in a state."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


def state_dict(model: nn.Module) -> dict[str, Any]:
    """The state of ``model`` (compacted by :func:`nnrelief.compact`, pruned with masks, or
    plain) that :func:`load_state_dict` loads into a fresh instance of its class.

    Tensors and primitive values only: ``torch.save`` it and read it back with
    ``torch.load(path, weights_only=True)``. A compaction that needed index maps in the graph
    (a ``torch.fx.GraphModule``) is not the user's class any more and is refused.
    """
    if isinstance(model, torch.fx.GraphModule):
        raise ValueError(
            f"{type(model).__name__}: this compaction needed channel index maps in the graph, so it is a torch.fx "
            "GraphModule, not your model's class, and cannot be loaded back into it; save it as a program instead "
            "(nnrelief compact -o small.pt2, or torch.export / nnrelief.compaction.export.export_program)"
        )
    modules = {}
    for path, module in model.named_modules():
        shapes = {name: _primitive(getattr(module, name)) for name in SHAPE_ATTRIBUTES if _is_shape(getattr(module, name, None))}
        if shapes:
            modules[path] = {"type": type(module).__name__, "attributes": shapes}
    maps = [
        {"path": path, "index": module.index.detach().cpu().clone(), "axis": int(module.axis), "zero_fill": bool(module.zero_fill)}
        for path, module in model.named_modules() if isinstance(module, ChannelMap)
    ]  # fmt: skip
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "class": class_name(model),
            "state": state_with_masks(model), "modules": modules, "channel_maps": maps}  # fmt: skip


def _is_shape(value: Any) -> bool:
    if isinstance(value, (tuple, list, torch.Size)):
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _primitive(value: Any) -> int | tuple[int, ...]:
    return value if isinstance(value, int) else tuple(int(v) for v in value)


def is_state(obj: Any) -> bool:
    """Whether ``obj`` is (or claims to be) a :func:`state_dict` of nnrelief."""
    return isinstance(obj, Mapping) and obj.get("format") == STATE_FORMAT


def check_state(state: Any, where: str = "the state") -> None:
    """Raise ``ValueError`` naming ``where`` unless ``state`` has the parts of a :func:`state_dict`."""
    if not is_state(state):
        raise ValueError(f"{where} is not an nnrelief.state_dict (no format {STATE_FORMAT!r}): for a plain state dict "
                         "use model.load_state_dict or nnrelief.restore_masks")  # fmt: skip
    version = state.get("version")
    if not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
        raise ValueError(f"{where}: nnrelief.state_dict version {version!r} is not one this nnrelief reads (1 to {STATE_VERSION})")
    parts = {"class": str, "state": Mapping, "modules": Mapping, "channel_maps": list}
    for key, kind in parts.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{where} is damaged: its {key!r} is missing or not a {kind.__name__}; save it again "
                             "with nnrelief.state_dict(model)")  # fmt: skip
    bad = next((key for key, value in state["state"].items() if not isinstance(value, Tensor)), None)
    if bad is not None:
        raise ValueError(f"{where} is damaged: its entry {bad!r} is not a tensor; save it again with nnrelief.state_dict(model)")
    entry = next((entry for entry in state["channel_maps"] if not _is_map_entry(entry)), None)
    if entry is not None:
        raise ValueError(f"{where} is damaged: a channel map entry is {entry!r:.80}; save it again with nnrelief.state_dict(model)")


def _is_map_entry(entry: Any) -> bool:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str) or not entry["path"]:
        return False
    return isinstance(entry.get("index"), Tensor) and isinstance(entry.get("axis"), int) and isinstance(entry.get("zero_fill"), bool)


def load_state_dict(model: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """Load a :func:`state_dict` into ``model``, a fresh instance of the class it was taken
    from (built as for training: a Hugging Face model from its config), and return ``model``.

    ``model``'s modules are narrowed to the state's shapes (new parameters and buffers,
    shape attributes set, ChannelMaps wrapped in), then every tensor is loaded strictly; a
    masked model gets its masks and gates back. A state that does not fit (another class,
    other modules, a tensor wider than the model's) raises ``ValueError`` naming the first
    differences, and ``model`` is left unchanged.
    """
    check_state(state)
    if state["class"] != class_name(model):
        raise StateMismatchError(f"the state is of class {state['class']}, the model given is {class_name(model)}")
    undo: list[Callable[[], None]] = []
    try:
        _wrap_maps(model, state["channel_maps"], undo)
        _set_attributes(model, state["modules"], undo)
        _reshape(model, state["state"], undo)
        restore_masks(model, state["state"], strict=True, infer=False)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    log.info("loaded an nnrelief.state_dict of %s (%d channel maps)", state["class"], len(state["channel_maps"]))
    return model


def _wrap_maps(model: nn.Module, maps: list[Any], undo: list[Callable[[], None]]) -> None:
    """Wrap each recorded module in its ChannelMap (outer ones first, as recorded)."""
    for entry in maps:
        path = entry["path"]
        parent_name, _, attribute = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            inner = getattr(parent, attribute)
        except AttributeError:
            inner = None
        if not isinstance(inner, nn.Module):
            raise StateMismatchError(f"the state wraps module {path} in a channel map, but {type(model).__name__} has no module there")
        device = next((t.device for t in _tensors(inner)), torch.device("cpu"))
        setattr(parent, attribute, ChannelMap(inner, entry["index"].to(device), entry["axis"], entry["zero_fill"]))
        undo.append(lambda parent=parent, attribute=attribute, inner=inner: setattr(parent, attribute, inner))


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _set_attributes(model: nn.Module, modules: Mapping[str, Any], undo: list[Callable[[], None]]) -> None:
    """Set the recorded shape attributes; a module missing or of another type is refused."""
    own = dict(model.named_modules())
    for path, record in modules.items():
        module = own.get(path)
        kind = record.get("type") if isinstance(record, Mapping) else None
        if module is None or type(module).__name__ != kind:
            found = "no module" if module is None else f"a {type(module).__name__}"
            raise StateMismatchError(f"the state has a {kind} at {path or '<root>'}, {type(model).__name__} has {found} there")
        for name, value in record.get("attributes", {}).items():
            if name in SHAPE_ATTRIBUTES and hasattr(module, name) and getattr(module, name) != value:
                old = getattr(module, name)
                setattr(module, name, value if isinstance(value, int) else type(old)(value))
                undo.append(lambda module=module, name=name, old=old: setattr(module, name, old))


def _reshape(model: nn.Module, entries: Mapping[str, Tensor], undo: list[Callable[[], None]]) -> None:
    """Give every parameter and buffer the shape of its entry (empty, to be loaded); an
    entry wider than the model's tensor, or of another rank, is refused with the others
    that do not fit (missing and unexpected keys)."""
    plain, _ = split_masks(entries)
    own = model.state_dict(keep_vars=True)
    gates = {key for key in plain if key.rpartition(".")[2] == GATE and key not in own}
    wider = [f"{key}: state {tuple(value.shape)}, model {tuple(own[key].shape)}" for key, value in plain.items()
             if key in own and not _narrower(value.shape, own[key].shape)]  # fmt: skip
    missing = [key for key in own if key not in plain]
    unexpected = [key for key in plain if key not in own and key not in gates]
    if wider or missing or unexpected:
        raise StateDictMismatchError(f"the state does not fit {type(model).__name__}", wider, missing, unexpected, _REMEDY)
    slots, done = _slots(model), set()
    for key, value in plain.items():
        old = own.get(key)
        if old is not None and old.shape != value.shape and id(old) not in done:
            done.add(id(old))
            new = torch.empty(value.shape, dtype=old.dtype, device=old.device)
            new = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
            for table, name in slots[id(old)]:  # tied tensors stay tied
                table[name] = new
                undo.append(lambda table=table, name=name, old=old: table.__setitem__(name, old))


def _narrower(shape: torch.Size, than: torch.Size) -> bool:
    """Whether a tensor of ``shape`` can be a narrowing of one of shape ``than``."""
    return len(shape) == len(than) and all(a <= b for a, b in zip(shape, than))


def _slots(model: nn.Module) -> dict[int, list[tuple[dict[str, Any], str]]]:
    """id of each parameter and buffer -> every (table, name) holding it."""
    slots: dict[int, list[tuple[dict[str, Any], str]]] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    slots.setdefault(id(tensor), []).append((table, name))
    return slots
