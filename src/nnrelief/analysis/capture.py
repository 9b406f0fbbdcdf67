"""One ``torch.export`` capture of a model, runnable, with watch points for statistics.

The model is exported non-strict (its Python runs as usual; Hugging Face models, dict
inputs and control flow on shapes work) to an ATen graph whose nodes carry the module they
ran in (``nn_module_stack``), with the batch dimension dynamic where the model allows it.
``ExportedProgram.module()`` gives a runnable ``GraphModule`` that shares the model's own
parameter and buffer tensors, so training and mask updates made in place are seen without
capturing again. Statistics are taken by :func:`watch` calls inserted after the watched
nodes, which feed whatever observers :func:`observing` installs (and do nothing otherwise).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from ..inputs import ModelInput
from .nodes import INNER

log = logging.getLogger(__name__)

_SINK: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("nnrelief_sink", default=None)


class TensorOutputs(nn.Module):
    """Calls the model and returns only the tensors of its output (drops caches etc.).

    With ``keywords``, the last positional inputs are passed to the model as those keyword
    inputs (torch.export cannot make the batch of a ``**kwargs`` input dynamic)."""

    def __init__(self, model: nn.Module, keywords: tuple[str, ...] = ()) -> None:
        super().__init__()
        setattr(self, INNER, model)
        self.keywords = keywords

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        if self.keywords:
            split = len(args) - len(self.keywords)
            args, kwargs = args[:split], {**dict(zip(self.keywords, args[split:])), **kwargs}
        output = getattr(self, INNER)(*args, **kwargs)
        if isinstance(output, Mapping):
            output = list(output.values())
        elif not isinstance(output, (tuple, list)):
            output = [output]
        return tuple(value for value in output if isinstance(value, Tensor))


def watch(keys: tuple[str, ...], value: Tensor) -> None:
    """Hand ``value`` to the observers of ``keys`` while :func:`observing` is active. They
    share one memo, so that what several need of the same tensor (|x|, its sum over all but
    the last dim) is computed once: Q, K and V read the same input, and an FFN's activity
    is its output layer's input."""
    sink = _SINK.get()
    if sink is None:
        return
    memo: dict[str, Tensor] = {}
    for key in keys:
        observer = sink.get(key)
        if observer is not None:
            observer.observe(value, memo)


@contextlib.contextmanager
def observing(observers: Mapping[str, Any]) -> Iterator[None]:
    """Route the :func:`watch` calls of captured graphs to ``observers`` (by key; each has
    ``observe(tensor, memo)``)."""
    token = _SINK.set(observers)
    try:
        yield
    finally:
        _SINK.reset(token)


@dataclass
class Capture:
    """A runnable ATen capture of a model (see the module docstring)."""

    module: fx.GraphModule
    dynamic_batch: bool
    keywords: tuple[str, ...] = ()  # keyword inputs, passed after the positional ones

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    def run(self, model_input: ModelInput) -> None:
        """One forward pass of the capture on ``model_input`` (no grad)."""
        with torch.no_grad():
            self.module(*model_input.args, *(model_input.kwargs[name] for name in self.keywords))

    def add_watch_points(self, points: Mapping[str, list[str]]) -> None:
        """Insert one ``watch(keys, node)`` after every node named in ``points`` (key -> nodes)."""
        nodes = {node.name: node for node in self.graph.nodes}
        placeholders = [node for node in self.graph.nodes if node.op == "placeholder"]
        keys_of: dict[str, list[str]] = {}
        for key, names in points.items():
            for name in names:
                keys_of.setdefault(name, []).append(key)
        for name, keys in keys_of.items():
            node = nodes[name]
            anchor = placeholders[-1] if node.op == "placeholder" else node  # none among the placeholders
            with self.graph.inserting_after(anchor):
                self.graph.call_function(watch, (tuple(keys), node))
        self.module.recompile()


def _identity_views(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    """Capture-time hook: a module returning its input unchanged (``nn.Identity``) gets a
    node of its own (a view), so that its output can be located and gated."""
    if isinstance(output, Tensor) and inputs and output is inputs[0]:
        return output.view_as(output)
    return None


def _dynamic_shapes(inputs: tuple[Any, ...]) -> dict[str, Any]:
    def spec(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] > 1:
            return {0: torch.export.Dim.AUTO}
        return None

    return {"args": tuple(spec(v) for v in inputs)} if inputs else {}


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch's tracing loggers say nothing meanwhile: a failed capture raises, and nnrelief
    reports what matters (fake-tensor errors would log their tracebacks first)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Export records a Python stack trace per node (about a sixth of its cost on the zoo's
    models); nnrelief reads none, so where torch has the switch they are not recorded."""
    try:
        config = importlib.import_module("torch.fx.config")
    except ImportError:  # older torch: no such switch
        config = None
    before = getattr(config, "do_not_emit_stack_traces", None)
    if before is None:
        yield
        return
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def capture(model: nn.Module, model_input: ModelInput, dynamic: bool = True) -> Capture:
    """Export ``model`` (in its current mode) on ``model_input``, with a dynamic batch where
    the model allows it (``dynamic``), else for these shapes; raises what export raises."""
    keywords = tuple(model_input.kwargs)
    wrapper = TensorOutputs(model, keywords)
    inputs = (*model_input.args, *model_input.kwargs.values())
    hooks = [m.register_forward_hook(_identity_views) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_torch(), _no_stack_traces():
            # Masked layers set their .weight in a pre-hook; export warns about the assignment.
            warnings.simplefilter("ignore")
            program = None
            if dynamic:
                try:
                    program = torch.export.export(wrapper, inputs, dynamic_shapes=_dynamic_shapes(inputs), strict=False)
                except Exception as error:  # noqa: BLE001 - retried with static shapes
                    log.debug("export with a dynamic batch failed (%s); static shapes", error)
            if program is None:
                program = torch.export.export(wrapper, inputs, strict=False)
            module = program.module()
    finally:
        for hook in hooks:
            hook.remove()
    placeholders = [node for node in module.graph.nodes if node.op == "placeholder"]
    dynamic = any(
        isinstance(node.meta.get("val"), Tensor) and not isinstance(node.meta["val"].shape[0], int)
        for node in placeholders if isinstance(node.meta.get("val"), Tensor) and node.meta["val"].dim() > 0
    )  # fmt: skip
    return Capture(module, dynamic, keywords)
