"""Model inputs beyond one tensor: positional tuples and keyword dicts (Hugging Face batches).

A :class:`ModelInput` is what one call ``model(*args, **kwargs)`` receives. Pruning batches
and compaction examples are turned into one by :func:`batch_input` / :func:`example_input`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor


@dataclass
class ModelInput:
    """Positional and keyword arguments of one forward call."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[Tensor]:
        """Every tensor argument, positional first."""
        return [value for value in (*self.args, *self.kwargs.values()) if isinstance(value, Tensor)]

    def map(self, fn: Any) -> ModelInput:
        """A copy with ``fn`` applied to every tensor argument."""
        convert = lambda value: fn(value) if isinstance(value, Tensor) else value  # noqa: E731
        return ModelInput(tuple(convert(v) for v in self.args), {k: convert(v) for k, v in self.kwargs.items()})

    def to(self, device: torch.device) -> ModelInput:
        """A copy on ``device``."""
        return self.map(lambda tensor: tensor.to(device))

    def head(self, count: int) -> ModelInput:
        """The first ``count`` samples (dim 0 of every tensor with a batch dim)."""
        return self.map(lambda tensor: tensor[:count] if tensor.dim() > 0 else tensor)

    @property
    def single_tensor(self) -> Tensor | None:
        """The input tensor when the call takes exactly one positional tensor, else None."""
        if len(self.args) == 1 and not self.kwargs and isinstance(self.args[0], Tensor):
            return self.args[0]
        return None

    def describe(self) -> str:
        """Shapes of the tensor arguments, for error messages."""
        parts = [str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__ for v in self.args]
        parts += [f"{k}={tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}" for k, v in self.kwargs.items()]
        return f"({', '.join(parts)})"


def example_input(example: Any) -> ModelInput:
    """A compaction/tracing example: a tensor, a tuple/list of positional inputs or a dict of
    keyword inputs."""
    if isinstance(example, ModelInput):
        return example
    if isinstance(example, Tensor):
        return ModelInput((example,))
    if isinstance(example, Mapping):
        return ModelInput((), dict(example))
    if isinstance(example, (tuple, list)):
        return ModelInput(tuple(example))
    raise TypeError(f"the example input is a {type(example).__name__}; expected a tensor, a tuple of inputs or a dict")


def batch_input(batch: Any, index: int) -> ModelInput:
    """The model input of pruning batch ``index``.

    A batch is an input tensor, a dict of keyword inputs (called as ``model(**batch)``; a
    Hugging Face ``BatchEncoding`` works), or a
    tuple/list ``(inputs, *targets)`` as a DataLoader yields it, whose first element is the
    input tensor, a tuple/list of positional inputs or a dict of keyword inputs.
    """
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
        if isinstance(batch, (tuple, list)):
            return ModelInput(tuple(batch))
    if isinstance(batch, Tensor):
        return ModelInput((batch,))
    if isinstance(batch, Mapping):
        return ModelInput((), dict(batch))
    raise TypeError(
        f"pruning batch {index} is a {type(batch).__name__}; expected an input tensor, a dict of keyword "
        "inputs, or an (inputs, target) pair whose inputs are a tensor, a tuple of positional inputs or a dict"
    )
