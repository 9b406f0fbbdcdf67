"""Channel rules of ATen graph nodes: how the channels of a node's output relate to the
channels of its inputs.

Every tensor node of a captured graph (see :mod:`nnrelief.analysis.capture`) gets a
:class:`NodeRule`. A tensor's *channel axis* is tracked through the graph: dim 1 of a conv
map, the last dim of a Linear output, moved by permute/transpose/reshape and kept by
elementwise ops, pooling and reductions over other dims. Sources that are not layer
outputs (model inputs, parameters, embeddings, anything after an op the rules do not
understand) have no channel axis: their channels count as always live, and whatever reads
them is used. Unknown operations are opaque: every input channel used, every output
channel live. So a rule that is missing can only make cleaning remove less, never more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


class Rule(Enum):
    """How a node's output channels derive from its inputs' channels."""

    INPUT = "input"          # model input or a constant: every channel live
    LAYER = "layer"          # a prunable layer (nnrelief.kinds)
    PASS = "pass"            # channel c depends on input channel c only
    FLATTEN = "flatten"      # the channel axis merged with neighbouring dims
    MERGE = "merge"          # elementwise combination of same-channel tensors
    CAT = "cat"              # concatenation along the channel axis
    PAD = "pad"              # zero padding along the channel axis
    OPAQUE = "opaque"        # not understood: all channels live, all inputs used
    IGNORE = "ignore"        # no channel semantics (shape queries, non-tensors)
    OUTPUT = "output"


@dataclass
class NodeRule:
    """The channel rule of one graph node.

    ``channels`` is the size of the node's channel axis (``axis``), None without one.
    FLATTEN: input channel c becomes the output entries ``o * (C * spatial) + c * spatial + s``
    for ``o < outer``, ``s < spatial`` (NCHW flatten: outer 1; channels-last: spatial 1).
    ``uses``: tensor inputs read as a whole (a broadcast factor such as RMSNorm's scale).
    """

    rule: Rule
    inputs: list[str]
    channels: int | None
    zero_preserving: bool = True
    spatial: int = 1
    pad: tuple[int, int] = (0, 0)
    layer: str | None = None
    product: bool = False  # a MERGE that multiplies: a channel is zero if any factor is
    outer: int = 1
    axis: int | None = None
    uses: list[str] = field(default_factory=list)


# ATen ops by overload packet name.
ZERO_PRESERVING = {
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "tanh", "tanh_", "hardtanh", "hardtanh_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "celu", "selu", "mish", "hardswish", "hardswish_", "dropout",
    "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout_", "clone", "contiguous", "alias", "detach", "_to_copy", "to", "type_as",
    "neg", "abs", "sign", "sin", "erf", "asin", "atan", "sinh", "asinh", "atanh", "tan", "lift_fresh_copy",
    "view_as", "square",
}  # fmt: skip
CONSTANT_MAKING = {"sigmoid", "sigmoid_", "exp", "softplus", "cos", "cosh", "hardsigmoid", "erfc", "log_sigmoid"}
POOLING = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "max_pool2d_with_indices", "upsample_nearest1d", "upsample_nearest2d", "upsample_bilinear2d",
    "upsample_bicubic2d", "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa",
}  # fmt: skip
BATCHNORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"}
REDUCTIONS = {"mean", "sum", "amax", "amin"}
VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "expand"}
ADDITIVE = {"add", "add_", "sub", "sub_", "rsub"}
PRODUCTS = {"mul", "mul_"}
DIVISIONS = {"div", "div_"}
SHAPE_ONLY = {"sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}


def _product(sizes: tuple[int | None, ...]) -> int | None:
    if any(size is None for size in sizes):
        return None
    return math.prod(sizes)


def map_axis(before: tuple[int | None, ...], axis: int, after: tuple[int | None, ...]) -> tuple[int, int, int] | None:
    """Where channel axis ``axis`` of a tensor of shape ``before`` lies after a reshape to
    ``after``: (new axis, outer, spatial) as in :class:`NodeRule` (1, 1 when the axis is
    kept whole), or None when the reshape splits or scrambles it."""
    channels, inner = before[axis], _product(before[axis + 1 :])
    if channels is None or inner is None:
        return None
    for new_axis, size in enumerate(after):
        inner_after = _product(after[new_axis + 1 :])
        if size is None or inner_after is None or inner % inner_after or size % channels:
            continue
        spatial = inner // inner_after
        if size == channels * spatial:
            return new_axis, 1, spatial
        outer = size // (channels * spatial)
        if size == outer * channels * spatial and _merges_before(before, axis, outer):
            return new_axis, outer, spatial
    return None


def _merges_before(before: tuple[int | None, ...], axis: int, outer: int) -> bool:
    """Whether some dims just before ``axis`` multiply to ``outer`` (a channels-last flatten)."""
    total = 1
    for size in reversed(before[:axis]):
        if size is None:
            return False
        total *= size
        if total == outer:
            return True
        if total > outer:
            return False
    return False


def normalise_dim(dim: int, ndim: int) -> int:
    """``dim`` as a non-negative index into ``ndim`` dims."""
    return dim + ndim if dim < 0 else dim
