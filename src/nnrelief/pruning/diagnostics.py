"""Which layer or batch a failed pruning pass failed on, and why, in the user's terms."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..inputs import ModelInput


class FeedError(Exception):
    """An error raised by the user's batches themselves (their loader), not by the model."""


def shape_text(model_input: ModelInput) -> str:
    """The shape of a single-tensor input, else every argument's shape."""
    tensor = model_input.single_tensor
    return str(tuple(tensor.shape)) if tensor is not None else model_input.describe()


def failing_layer(model: nn.Module, x: ModelInput) -> tuple[str, BaseException] | None:
    """Run ``model`` on ``x`` plainly; the innermost module that raised, and its error."""
    entered: list[str] = []

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        entered.pop()

    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(lambda _m, _i, name=name: entered.append(name)))
            hooks.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad():
            x(model)
    except Exception as error:  # noqa: BLE001 - reported to the user with its layer
        return (entered[-1] if entered else "", error)
    finally:
        for hook in hooks:
            hook.remove()
    return None


def rejected_input(model: nn.Module, x: ModelInput) -> ValueError | None:
    """A clear error if ``model`` fails on (one sample of) ``x``, naming the layer; None if it runs."""
    failure = failing_layer(model, x.head(1))
    if failure is None:
        return None
    name, cause = failure
    where = f" in layer {name} ({type(model.get_submodule(name)).__name__})" if name else ""
    return ValueError(
        f"the model rejected a pruning batch of shape {shape_text(x)}{where}: {type(cause).__name__}: {cause}; "
        "give batches of the inputs the model was built for"
    )


def explain_run_failure(index: int, shape: str | None, error: BaseException) -> ValueError:
    """The error of a batch the model failed on while the statistics streamed."""
    return ValueError(f"the model rejected pruning batch {index} of shape {shape}: {type(error).__name__}: {error}")
