"""The section of ``report.md`` on one model file (``nnrelief report MODEL_FILE``): what the
file holds, its accuracy, parameters and MACs, and the per-layer table."""

from __future__ import annotations

from ..modelfile import ModelEvaluation


def model_markdown(evaluation: ModelEvaluation) -> str:
    """A Markdown section: a heading, a paragraph of totals and a table of the layers."""
    loaded, result, summary = evaluation.file, evaluation.result, evaluation.summary
    kept, total = summary.params_nonzero, summary.params_total
    share = 100 * kept / total if total else 100.0
    lines = [
        f"## {loaded.path.name}",
        "",
        (f"`{loaded.path}`: {loaded.kind}, {loaded.architecture}. {evaluation.dataset} {evaluation.split} split "
         f"({result.n:,} samples): accuracy {100 * result.accuracy:.2f}%, loss {result.loss:.4f}. "
         f"{kept:,} of {total:,} Linear/conv weights and biases nonzero ({share:.2f}%); "
         f"{summary.macs_sparse:,} MACs per sample counting nonzero weights, {summary.macs_dense:,} dense."),
        "",
        "| layer | kind | weight shape | nonzero params | MACs dense | MACs sparse | alive |",
        "|---|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for layer in summary.layers:
        shape = "x".join(map(str, layer.weight_shape))
        lines.append(f"| {layer.name} | {layer.kind} | {shape} | {layer.params_nonzero:,}/{layer.params_total:,} | "
                     f"{layer.macs_dense:,} | {layer.macs_sparse:,} | {layer.channels_alive}/{layer.channels_total} |")  # fmt: skip
    return "\n".join(lines)
