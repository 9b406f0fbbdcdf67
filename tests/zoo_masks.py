"""Mask hashes of every zoo model after fixed pruning passes: the reference the pruning core
must keep reproducing while its internals change.

``python tests/zoo_masks.py`` rewrites ``tests/data/zoo_masks.json`` from the code as it is
(run it only on a commit whose masks are the reference); ``tests/test_zoo_masks.py``
recomputes the masks and compares. float64 throughout, fixed seeds and inputs, a quarter of
every BatchNorm's channels planted dead (gamma = beta = 0) so that dead-filter removal,
backward cleaning and the residual rule all act.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

import nnrelief
from nnrelief.models import INPUT_SHAPES, MODELS
from nnrelief.pruning.masks import state_with_masks

REFERENCE = Path(__file__).parent / "data" / "zoo_masks.json"
CASES = ["lenet300_100", "lenet5", "vgg_like", "resnet20", "resnet18_tiny", "mobilenetv2_cifar"]
SCORES = ["paper", "authors"]
PASSES = [(0.9, 0.8), (0.9, 0.85)]  # (alpha_fc, alpha_conv) of each pass


def _plant_dead_channels(model: nn.Module) -> None:
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.BatchNorm2d):
                quarter = norm.num_features // 4
                norm.weight[1 : 1 + quarter] = 0.0
                norm.bias[1 : 1 + quarter] = 0.0


def pruned_masks(name: str, score: str) -> dict[str, torch.Tensor]:
    """The masks (and shortcut gates) of zoo model ``name`` after the passes of :data:`PASSES`."""
    torch.manual_seed(0)
    model = MODELS[name](num_classes=10).double()
    _plant_dead_channels(model)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(32, *INPUT_SHAPES[name], generator=generator, dtype=torch.float64)
    for alpha_fc, alpha_conv in PASSES:
        nnrelief.prune(model, [x[:16], x[16:]], alpha_fc=alpha_fc, alpha_conv=alpha_conv, score=score, progress=False)
    return {key: value.bool() for key, value in state_with_masks(model).items() if key.endswith("_mask") or key.endswith("nnrelief_gate")}


def digest(masks: dict[str, torch.Tensor]) -> dict[str, object]:
    """sha256 over the masks in key order, and the kept count of each (to locate a change)."""
    hasher = hashlib.sha256()
    for key in sorted(masks):
        hasher.update(key.encode())
        hasher.update(masks[key].contiguous().numpy().tobytes())
    return {"sha256": hasher.hexdigest(), "kept": {key: int(masks[key].sum()) for key in sorted(masks)}}


def main() -> None:
    torch.set_num_threads(1)
    reference = {f"{name}/{score}": digest(pruned_masks(name, score)) for name in CASES for score in SCORES}
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
