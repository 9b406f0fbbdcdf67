"""The ``nnrelief`` command: ``train``, ``prune``, ``eval``, ``demo``, ``report``, ``compare``
and ``compact``.

Every experiment command takes its settings from, in increasing priority: the defaults
of :class:`~nnrelief.experiments.config.ExperimentConfig`, a ``--preset``, a ``--config`` TOML
file and the individual flags. Runs live in ``<runs-root>/<preset or model-dataset>-<hash
of the settings>`` and resume when the same command is run again.

Examples::

    nnrelief demo                                   # offline, about 15 s on 2 CPU cores
    nnrelief train --preset lenet300-mnist --data-dir data --download
    nnrelief prune --preset lenet300-mnist --data-dir data --num-iters 5
    nnrelief prune --preset resnet20-cifar10 --data-dir data --early-stop-margin 0.01
    nnrelief prune --config my_experiment.toml --seed 1
    nnrelief eval runs/demo-<hash>/model-iter5.pt
    nnrelief compact runs/demo-<hash>/model-iter5.pt -o small.pt --onnx small.onnx
    torchrun --standalone --nproc-per-node 4 -m nnrelief prune --preset resnet20-cifar10 --data-dir data

``train``, ``prune`` and ``demo`` run under ``torchrun`` (see :mod:`nnrelief.distributed`):
rank 0 alone prints and writes the run folder; the other commands need one process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__, distributed
from . import data as nndata
from .compaction import compact, compaction_summary, format_summary
from .compaction.export import export_onnx, export_program, export_torchscript, save_sparse
from .compaction.statedict import state_dict
from .experiments import runfolder as files
from .experiments.compare import BASELINES, DEFAULT_METHODS, Comparison, run_comparison
from .experiments.config import PRESETS, ConfigError, ExperimentConfig, resolve_config, run_name
from .experiments.experiment import Experiment, load_weights
from .experiments.oneshot import DEFAULT_ONE_SHOT, ONE_SHOT_METHODS, check_one_shot, run_one_shot
from .experiments.runfolder import refuse_overwrite
from .fileio import save_text, save_torch
from .metrics import file_size
from .modelfile import evaluate_model_file, require_state_dict
from .reporting.results import (
    load_results,
    plot_results,
    results_tables,
    run_results,
    save_results,
    update_marked_blocks,
)
from .reporting.seeds import seed_groups
from .settings import describe, flag_of, specs, suggestion
from .verbosity import WARNINGS_LOGGER, level_of, library_messages

logger = logging.getLogger("nnrelief.cli")

_EXPORTERS: dict[str, Callable[..., Path]] = {
    ".pt": export_torchscript, ".ts": export_torchscript, ".pt2": export_program, ".onnx": export_onnx,
    ".sparse": lambda model, _example, path: save_sparse(model, path),
}  # fmt: skip
_TRUST_HELP = ("unpickle a model file that holds more than tensors (a torch.save'd module, a sparse file of "
               "format 1): this can run code stored in the file, so only for a file you trust")
_FORMAT_HELP = ".pt or .ts (TorchScript), .pt2 (torch.export ExportedProgram), .onnx (ONNX), .sparse (sparse format)"

# Commands that run under torchrun with several processes (the others need one).
_DISTRIBUTED_COMMANDS = frozenset({"train", "prune", "demo"})
# Errors caused by the user's input or environment, or another rank's failure under torchrun:
# reported in one line and the lines of its ``details`` if it has some (traceback with -vv).
# Anything else is a bug and shows its traceback.
_USER_ERRORS = (ConfigError, ValueError, OSError, distributed.DistributedError)

_EXAMPLES = """examples:
  nnrelief demo
  nnrelief train --preset lenet300-mnist --data-dir data --download
  nnrelief prune --preset lenet300-mnist --data-dir data --num-iters 5
  nnrelief prune --config my_experiment.toml --seed 1
  nnrelief eval runs/demo-<hash>/model-iter5.pt
  nnrelief report runs/demo-<hash>
  nnrelief compare --preset demo --methods magnitude random
  nnrelief compact runs/demo-<hash>/model-iter5.pt -o small.pt --onnx small.onnx

Run 'nnrelief COMMAND --help' for the options of a command."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``<prog>: error: <reason>``; flags are
    never abbreviated, and an unknown one is answered with the closest known flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.commands: Mapping[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(parsed, "command", None), self)
            self.error(f"unrecognized arguments: {' '.join(extras)}{_flag_suggestion(extras, command)}")
        return parsed


def _flag_suggestion(extras: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """``" (did you mean --x?)"`` for the first unknown flag among ``extras``, ``_`` read as ``-``."""
    flags = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    unknown = next((word.partition("=")[0] for word in extras if word.startswith("--")), None)
    return "" if unknown is None else suggestion(unknown, flags, lambda flag: flag.replace("_", "-"))


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__
    return parse


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _add_field_flags(parser: argparse.ArgumentParser, preset: str | None) -> None:
    """One flag per setting, read from its declaration; the help shows the value the
    setting has by default or in ``preset``."""
    group = parser.add_argument_group(
        "experiment settings (override preset and config file)" + (f"; values shown: preset {preset}" if preset else "")
    )
    values = {**ExperimentConfig().to_dict(), **PRESETS.get(preset or "", {})}
    hints = typing.get_type_hints(ExperimentConfig)
    for name, spec in specs(ExperimentConfig).items():
        if not spec.flag:
            continue
        hint, optional = _unwrapped(hints[name])
        text = f"{describe(spec)} ({'preset' if preset and name in PRESETS[preset] else 'default'}: {_shown(values[name])})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            kwargs.update(nargs="*", type=typing.get_args(hint)[0], metavar=spec.metavar or "VALUE")
        else:
            kwargs["type"] = _optional(hint) if optional else hint
            kwargs["metavar"] = spec.metavar or ("{" + ",".join(spec.choices) + "}" if spec.choices else name.upper())
        group.add_argument(flag_of(name), **kwargs)


def _unwrapped(hint: Any) -> tuple[Any, bool]:
    """(the type of ``hint`` without ``| None``, whether it had ``| None``)."""
    args = typing.get_args(hint)
    if type(None) not in args:
        return hint, False
    (inner,) = [a for a in args if a is not type(None)]
    return inner, True


def _add_common(parser: argparse.ArgumentParser, top_level: bool) -> None:
    """-v/-q/--threads, accepted before and after the subcommand (the subcommand's copy
    only sets a value when given, so it never hides the top-level one)."""
    group = parser.add_argument_group("output and resources")

    def default(value: Any) -> Any:
        return value if top_level else argparse.SUPPRESS

    group.add_argument("-v", "--verbose", action="count", default=default(0),
                       help="log progress on stderr (-v: per-epoch and per-iteration lines, -vv: debug)")
    group.add_argument("-q", "--quiet", action="count", default=default(0),
                       help="errors and results only (no warnings, no progress bars)")
    group.add_argument("--threads", type=int, metavar="N", default=default(None),
                       help="CPU threads used by torch (default: torch's choice; demo: 1)")


def _add_experiment_options(parser: argparse.ArgumentParser, preset: str | None, shown: str | None) -> None:
    """The options of a command running an experiment: ``preset`` is its default preset,
    ``shown`` the preset whose values the help of the settings shows."""
    group = parser.add_argument_group("experiment")
    group.add_argument("--preset", default=preset, metavar="NAME",
                       help=f"named settings: {', '.join(PRESETS)}" + (f" (default: {preset})" if preset else ""))
    group.add_argument("--config", type=Path, metavar="FILE.toml",
                       help="TOML file of settings (keys as the flags below with '_', optional 'preset')")
    group.add_argument("--run-dir", type=Path, metavar="DIR",
                       help="run folder (default: <runs-root>/<preset or model-dataset>-<settings hash>)")
    group.add_argument("--runs-root", type=Path, default=Path("runs"), metavar="DIR",
                       help="parent folder of automatically named run folders (default: runs)")
    group.add_argument("--download", action="store_true",
                       help="download the dataset into --data-dir if it is missing")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_field_flags(parser, shown if shown in PRESETS else preset)


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``nnrelief`` command; the help of the experiment settings
    shows the values of ``preset`` (else the defaults, and the demo's for ``demo``)."""
    parser = _Parser(
        prog="nnrelief",
        description="NNrelief: prune neural networks by the signal their connections carry.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_train, _add_prune, _add_eval, _add_demo, _add_report, _add_results, _add_compare, _add_compact):
        if add in _EXPERIMENT_ADDERS:
            add(commands, preset)
        else:
            add(commands)
    parser.commands = commands.choices
    return parser


def _preset_of(argv: Sequence[str]) -> str | None:
    """The ``--preset`` given in ``argv``, if any (for the help of the settings)."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--preset")
    return early.parse_known_args(argv)[0].preset


def _experiment_command(
    commands: Any, name: str, shown: str | None, handler: Any, preset: str | None = None, **texts: str
) -> argparse.ArgumentParser:
    """A subcommand that runs an experiment: its settings' flags (``preset``'s defaults),
    the common options and ``handler``."""
    parser = commands.add_parser(name, **texts)
    _add_experiment_options(parser, preset=preset, shown=shown)
    _add_common(parser, top_level=False)
    parser.set_defaults(handler=handler)
    return parser


def _add_train(commands: Any, shown: str | None) -> None:
    _experiment_command(
        commands, "train", shown, _cmd_train, help="train the dense model of an experiment",
        description="Train the dense model (saving initial and trained weights in the run "
        "folder); 'nnrelief prune' with the same settings continues from it.",
    )  # fmt: skip


def _add_prune(commands: Any, shown: str | None) -> None:
    _experiment_command(
        commands, "prune", shown, _cmd_prune, help="run the iterative NNrelief procedure (training first if needed)",
        description="Dense training (unless the run folder has it), then the iterations "
        "prune -> evaluate -> retrain -> evaluate. Interrupted runs resume when the same "
        "command is run again. Prints the per-iteration table at the end.",
    )  # fmt: skip


def _add_eval(commands: Any) -> None:
    evaluate_cmd = commands.add_parser(
        "eval", help="accuracy, parameters, MACs and architecture of a checkpoint",
        description="Evaluate a model file: a state_dict (e.g. runs/<run>/model-iter3.pt), a TorchScript "
        "or .pt2 file or an nnrelief.state_dict (nnrelief compact -o / --state-dict; ONNX and sparse files are "
        "refused, naming what to use) or a torch.save'd module (with --trust-file), told apart by content. "
        "Inside a run folder the model, dataset and data folder come from its config.json.",
    )  # fmt: skip
    evaluate_cmd.add_argument("checkpoint", type=Path, help="the model file")
    evaluate_cmd.add_argument("--model", help="architecture (default: the run's)")
    evaluate_cmd.add_argument("--dataset", help="dataset (default: the run's)")
    evaluate_cmd.add_argument("--data-dir", help="dataset folder (default: the run's)")
    evaluate_cmd.add_argument("--split", choices=("test", "train"), default="test",
                              help="split to evaluate on (default: test)")
    evaluate_cmd.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
    evaluate_cmd.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate_cmd.add_argument("--download", action="store_true", help="download a missing dataset")
    evaluate_cmd.add_argument("--trust-file", action="store_true", help=_TRUST_HELP)
    _add_common(evaluate_cmd, top_level=False)
    evaluate_cmd.set_defaults(handler=_cmd_eval)


def _add_demo(commands: Any, shown: str | None) -> None:
    _experiment_command(
        commands, "demo", shown, _cmd_demo, preset="demo", help="offline demo: LeNet-300-100 on the bundled MNIST sample",
        description="Train LeNet-300-100 briefly on the MNIST sample shipped with the package "
        "and run a few NNrelief iterations (about half a minute on 2 CPU cores); prints the "
        "per-iteration table. Same options as 'prune', with --preset demo.",
    )  # fmt: skip


def _add_report(commands: Any) -> None:
    report = commands.add_parser(
        "report", help="figures and a Markdown report of run folders (needs matplotlib)",
        description="Draw the connection picture (dense vs pruned), the architecture per iteration and "
        "test accuracy / remaining weights across iterations (several runs overlaid), and write "
        "report.md with the figures and the per-iteration tables.",
    )  # fmt: skip
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run folder(s), or model files (a state dict, TorchScript, .pt2, nnrelief.state_dict "
                        "or torch.save'd module)")
    report.add_argument("--model", help="architecture of a state dict outside a run folder")
    report.add_argument("--dataset", help="dataset of a model file outside a run folder (accuracy on its test split)")
    report.add_argument("-o", "--out-dir", type=Path, metavar="OUT_DIR",
                        help="output folder (default: RUN_DIR/report; required for several runs)")
    report.add_argument("--iteration", type=int, metavar="K",
                        help="pruned model of the connection picture (default: the run's selected iteration)")
    report.add_argument("--samples", type=int, default=500, metavar="N",
                        help="training images the connection scores are computed on (default: 500)")
    report.add_argument("--data-dir", metavar="DIR", help="dataset folder (default: the run's)")
    report.add_argument("--max-neurons", type=int, default=12, metavar="N",
                        help="neurons drawn per layer in the connection picture (default: 12)")
    report.add_argument("--trust-file", action="store_true", help=_TRUST_HELP)
    report.add_argument("--json", type=Path, metavar="FILE",
                        help="write the run's results file (format of docs/results/) instead of the "
                        "figures (both with -o); one run folder only")
    report.add_argument("--command", dest="run_command", metavar="TEXT",
                        help="with --json: the exact command that made the run (default: one "
                        "rebuilt from its settings)")
    report.add_argument("--device-name", metavar="TEXT",
                        help="with --json: where the run ran, e.g. 'cpu (2 cores)' (default: its device setting)")
    _add_common(report, top_level=False)
    report.set_defaults(handler=_cmd_report)


def _add_results(commands: Any) -> None:
    results = commands.add_parser(
        "results", help="tables and figures from results files (nnrelief report RUN --json FILE)",
        description="Read results files and write results.md (one table per file: remaining weights, "
        "accuracies, MACs, channels, baselines at the same iteration; files whose settings differ only "
        "by seed make one table of the mean and spread per iteration), results.png and results-macs.png "
        "(test accuracy against remaining weights and against MACs, NNrelief and baselines).",
    )  # fmt: skip
    results.add_argument("files", nargs="+", type=Path, metavar="FILE.json", help="results file(s)")
    results.add_argument("-o", "--out-dir", type=Path, required=True, metavar="OUT_DIR", help="output folder")
    results.add_argument("--into", type=Path, metavar="DOC.md",
                         help="also put each file's table into DOC.md between the lines "
                         "'<!-- results: NAME -->' and '<!-- /results: NAME -->' (NAME: the file's name "
                         "without .json; for runs that differ only by seed their names joined by '+'), "
                         "leaving the rest of DOC.md as it is")  # fmt: skip
    _add_common(results, top_level=False)
    results.set_defaults(handler=_cmd_results)


def _add_compare(commands: Any, shown: str | None) -> None:
    compare = _experiment_command(
        commands, "compare", shown, _cmd_compare,
        help="NNrelief vs magnitude, global magnitude, random and L1-filter pruning at equal weights or MACs",
        description="Run NNrelief (reusing the run folder 'nnrelief prune' would use) and the baselines from "
        "the same dense weights with the same retraining: layer-wise magnitude and random pruning to "
        "NNrelief's per-layer counts, global magnitude to its total count, L1-norm filter pruning (conv nets) "
        "to its MACs, at every iteration. Writes <run folder>/compare/compare.csv, .json, .md and the figures "
        "compare.png (accuracy vs remaining weights) and compare-macs.png (accuracy vs MACs); resumes when run again.",
    )  # fmt: skip
    defaults = [name for name in DEFAULT_METHODS if name in BASELINES]
    known = list(dict.fromkeys([*BASELINES, *ONE_SHOT_METHODS]))
    compare.add_argument("--methods", nargs="+", choices=known, metavar="METHOD",
                         help=f"baselines to run besides NNrelief: {', '.join(BASELINES)} (default: {' '.join(defaults)}); "
                         f"with --one-shot, the methods to run: {', '.join(ONE_SHOT_METHODS)} (default: "
                         f"{' '.join(DEFAULT_ONE_SHOT)})")  # fmt: skip
    shot = compare.add_argument_group("one shot (no retraining)")
    shot.add_argument("--one-shot", action="store_true",
                      help="prune the dense model once per method, sparsity and calibration draw, no retraining, and "
                      "evaluate on the test split (a language model too: bits per byte); writes <run folder>/one-shot/"
                      "(one-shot.md, .csv, rows.json, one-shot.png); resumes when run again")  # fmt: skip
    shot.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8], metavar="S",
                      help="fractions of the scored weights and biases to remove (default: 0.5 0.6 0.7 0.8)")
    shot.add_argument("--draws", type=int, default=3, help="calibration draws (prune_samples samples each; default 3)")
    shot.add_argument("--test-samples", type=int, metavar="N",
                      help="evaluate on the first N test samples (a language model: windows of its context) instead "
                      "of the whole test split")  # fmt: skip
    shot.add_argument("--recompute-bn", action="store_true",
                      help="recompute BatchNorm statistics on the calibration samples after pruning (CNNs); "
                      "files in <run folder>/one-shot-bn/")  # fmt: skip


def _add_compact(commands: Any) -> None:
    compact_cmd = commands.add_parser(
        "compact", help="physically remove pruned neurons/channels and export the smaller model",
        description="Build a dense model without the removed neurons and channels (same "
        "outputs as the masked model), save it as TorchScript (.pt) or a torch.export "
        "ExportedProgram (.pt2), optionally also as ONNX, in the sparse format and as an "
        "nnrelief.state_dict (loads into the model's own class), and print "
        "parameters, MACs, architecture and file sizes before and after.",
    )  # fmt: skip
    compact_cmd.add_argument("checkpoint", type=Path, help="a pruned state_dict, e.g. runs/<run>/model-iter5.pt")
    compact_cmd.add_argument("-o", "--output", type=Path, required=True,
                             help="output file; its extension chooses the format: " + _FORMAT_HELP)
    compact_cmd.add_argument("--onnx", type=Path, metavar="FILE", help="also export ONNX (needs nnrelief[export])")
    compact_cmd.add_argument("--sparse", type=Path, metavar="FILE",
                             help="also save in the sparse format (size grows with the remaining weights)")
    compact_cmd.add_argument("--state-dict", type=Path, metavar="FILE",
                             help="also save nnrelief.state_dict (tensors and the compacted shapes): loads into the "
                             "model's own class with nnrelief.load_state_dict; nnrelief eval reads it")
    compact_cmd.add_argument("--model", help="architecture (default: the run's)")
    compact_cmd.add_argument("--dataset", help="dataset, for the number of classes and input shape (default: the run's)")
    _add_common(compact_cmd, top_level=False)
    compact_cmd.set_defaults(handler=_cmd_compact)


_EXPERIMENT_ADDERS = (_add_train, _add_prune, _add_demo, _add_compare)


# ----------------------------------------------------------------------------- commands


def _experiment(args: argparse.Namespace) -> Experiment:
    names = [f.name for f in dataclasses.fields(ExperimentConfig)]
    overrides = {name: getattr(args, name) for name in names if hasattr(args, name)}
    cfg, label = resolve_config(args.preset, args.config, overrides)
    run_dir = args.run_dir if args.run_dir is not None else args.runs_root / run_name(cfg, label)
    experiment = Experiment(cfg, run_dir, download=args.download, progress=_progress(args))
    logger.info("run folder: %s", run_dir)
    return experiment


def _progress(args: argparse.Namespace) -> bool:
    return not (args.no_progress or args.quiet)


def _cmd_train(args: argparse.Namespace) -> int:
    with _experiment(args) as experiment:  # the run folder's lock is released at the end
        model = experiment.train_dense()
        print(f"dense {experiment.cfg.model} on {experiment.cfg.dataset}: {_dense_scores(experiment, model)}")
    print(f"initial weights: {experiment.folder / files.INIT}")
    print(f"trained weights: {experiment.folder / files.TRAINED}")
    return 0


def _dense_scores(experiment: Experiment, model: torch.nn.Module) -> str:
    """Validation and test accuracy of a classifier; a language model's loss in bits per
    byte (its tokens are bytes) and perplexity."""
    if not experiment.cfg.is_language_model:
        accuracy = experiment.accuracies(model)
        return f"validation accuracy {100 * accuracy['val']:.2f}%, test accuracy {100 * accuracy['test']:.2f}%"
    val, test = experiment.evaluations(model).values()
    return (f"validation {val.bits_per_token:.4f} bits per byte (perplexity {val.perplexity:.3f}), "
            f"test {test.bits_per_token:.4f} bits per byte (perplexity {test.perplexity:.3f})")  # fmt: skip


def _cmd_prune(args: argparse.Namespace) -> int:
    with _experiment(args) as experiment:
        done = experiment.finished()
        if done is not None:
            experiment.record_finished(done)
            print(done.table())
            count = done.records[-1].iteration
            print(f"{experiment.run_dir}: already finished ({count} iteration{'' if count == 1 else 's'}, selected "
                  f"{files.model_file(done.selected_iteration)}); nothing to do")  # fmt: skip
            return 0
        history = experiment.run()
    print(history.table())
    print(f"run folder: {experiment.run_dir} (history.csv, history.json, model-iter<k>.pt)")
    print(f"selected model: {experiment.folder / files.model_file(history.selected_iteration)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.threads is None:
        torch.set_num_threads(1)  # the demo's small model is fastest on one thread
    start = time.perf_counter()
    code = _cmd_prune(args)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return code


def _cmd_eval(args: argparse.Namespace) -> int:
    evaluation = evaluate_model_file(
        args.checkpoint, model=args.model, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
        batch_size=args.batch_size, device=args.device, download=args.download, trust=args.trust_file,
    )  # fmt: skip
    loaded, result, summary = evaluation.file, evaluation.result, evaluation.summary
    kept, total = summary.params_nonzero, summary.params_total
    print(f"checkpoint: {args.checkpoint} ({loaded.kind})")
    print(f"model: {loaded.architecture}, {evaluation.dataset} {args.split} split, {result.n} samples")
    print(f"accuracy: {100 * result.accuracy:.2f}%   loss: {result.loss:.4f}")
    print(f"parameters (Linear/conv): {kept:,} / {total:,} remaining ({100 * kept / total:.2f}%), "
          f"compression {total / kept if kept else float('inf'):.2f}x")  # fmt: skip
    print(f"MACs per sample: {summary.macs_sparse:,} counting unpruned weights, {summary.macs_dense:,} dense")
    print(summary.table())
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .reporting import write_report

    folders = [path for path in args.run_dirs if not path.is_file()]
    model_files = [path for path in args.run_dirs if path.is_file()]
    if args.json is not None:
        if len(args.run_dirs) != 1 or model_files:
            raise ConfigError(f"--json takes one run folder, got {', '.join(map(str, args.run_dirs))}")
        refuse_overwrite(args.json, args.run_dirs, "--json")
        results = run_results(args.run_dirs[0], command=args.run_command, device=args.device_name)
        print(f"results: {save_results(results, args.json)}")
        if args.out_dir is None:
            return 0
    if args.out_dir is None and len(args.run_dirs) > 1:
        raise ConfigError("give an output folder (-o OUT_DIR) for several runs or model files")
    out_dir = args.out_dir if args.out_dir is not None else _default_report_folder(args.run_dirs[0])
    models = [evaluate_model_file(path, model=args.model, dataset=args.dataset, data_dir=args.data_dir, trust=args.trust_file)
              for path in model_files]  # fmt: skip
    path = write_report(folders, out_dir, iteration=args.iteration, samples=args.samples,
                        data_dir=args.data_dir, max_nodes=args.max_neurons, models=models)  # fmt: skip
    print(f"report: {path}")
    for figure in sorted(path.parent.glob("*.png")):
        print(f"figure: {figure}")
    return 0


def _default_report_folder(target: Path) -> Path:
    """RUN_DIR/report for a run folder, <stem>-report next to a model file."""
    return target.with_name(f"{target.stem}-report") if target.is_file() else target / "report"


def _cmd_results(args: argparse.Namespace) -> int:
    groups = seed_groups({path.stem: load_results(path) for path in args.files})
    tables = results_tables(groups)
    markdown = "\n".join(tables.values())
    document = None
    if args.into is not None:
        old = _read_text(args.into)
        document = update_marked_blocks(old, tables, str(args.into))
    table = args.out_dir / "results.md"
    save_text(markdown, table)
    figures = [plot_results(groups, args.out_dir / name, x=x)
               for name, x in (("results.png", "weights"), ("results-macs.png", "macs"))]  # fmt: skip
    updated = document is not None and document != old
    if updated:
        save_text(document, args.into)
    print(markdown)  # after every file is written: `| head` must not stop the writing
    print(f"table: {table}")
    for figure in figures:
        print(f"figure: {figure}")
    if updated:
        print(f"updated: {args.into}")
    return 0


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None


def _cmd_compare(args: argparse.Namespace) -> int:
    if args.one_shot:
        return _one_shot(args)
    methods = args.methods or [name for name in DEFAULT_METHODS if name in BASELINES]
    if [name for name in methods if name not in BASELINES]:
        raise ConfigError(f"--methods {' '.join(name for name in methods if name not in BASELINES)}: only with --one-shot; "
                          f"the baselines of an iterative comparison are {', '.join(BASELINES)}")  # fmt: skip
    with _experiment(args) as experiment:
        comparison = run_comparison(experiment, ["nnrelief", *methods], progress=_progress(args))
    figures = _comparison_figures(comparison)
    print(comparison.markdown())
    print(f"comparison files: {comparison.folder} (compare.csv, compare.json, compare.md{''.join(', ' + f for f in figures)})")
    return 0


def _one_shot(args: argparse.Namespace) -> int:
    methods = args.methods or list(DEFAULT_ONE_SHOT)
    check_one_shot(methods, args.sparsities, args.draws, args.test_samples)
    with _experiment(args) as experiment:
        result = run_one_shot(experiment, methods, args.sparsities, draws=args.draws, recompute_bn=args.recompute_bn,
                              test_samples=args.test_samples, progress=_progress(args))  # fmt: skip
    from .reporting import MissingPlotDependencyError, plot_one_shot

    figure = ""
    try:
        plot_one_shot(result.summary(), result.folder / "one-shot.png", metric=result.metric, title=result.title)
        figure = ", one-shot.png"
    except MissingPlotDependencyError as error:
        logger.warning("no one-shot figure: %s", error)
    print(result.markdown())
    print(f"one-shot files: {result.folder} (one-shot.md, one-shot.csv, rows.json{figure})")
    return 0


def _comparison_figures(comparison: Comparison) -> list[str]:
    """Draw compare.png (accuracy vs remaining weights) and compare-macs.png (vs MACs) and
    link them from compare.md; none without matplotlib (a warning says so)."""
    from .reporting import MissingPlotDependencyError, plot_comparison

    cfg = comparison.experiment.cfg
    title = f"{cfg.model} on {cfg.dataset}, {cfg.optimizer}, seed {cfg.seed}"
    figures = {"compare.png": ("weights", "test accuracy vs remaining weights"), "compare-macs.png": ("macs", "test accuracy vs MACs")}
    try:
        for name, (x, _) in figures.items():
            plot_comparison(comparison.curves(x), comparison.folder / name, title=title, x=x)
    except MissingPlotDependencyError as error:
        logger.warning("no comparison figures: %s", error)
        return []
    comparison.write_markdown({name: alt for name, (_, alt) in figures.items()})
    return list(figures)


def _cmd_compact(args: argparse.Namespace) -> int:
    if args.output.suffix.lower() not in _EXPORTERS:
        raise ConfigError(f"-o {args.output}: unknown extension {args.output.suffix!r}; use {_FORMAT_HELP}")
    given = (("-o", args.output), ("--onnx", args.onnx), ("--sparse", args.sparse), ("--state-dict", args.state_dict))
    outputs = [(option, path) for option, path in given if path is not None]
    for index, (option, path) in enumerate(outputs):
        refuse_overwrite(path, [args.checkpoint], option)
        same = [other for other, earlier in outputs[:index] if earlier.resolve() == path.resolve()]
        if same:
            raise ConfigError(f"{same[0]} and {option} both name {path}: give each output its own file")
    require_state_dict(args.checkpoint)
    model, cfg = load_weights(args.checkpoint, args.model, args.dataset)
    shape = nndata.get_spec(args.dataset or cfg.dataset).image_shape
    example = torch.zeros(2, *shape)
    smaller = compact(model, example)
    state = None if args.state_dict is None else state_dict(smaller)  # refused (an index-map graph) before any write
    written = [_EXPORTERS[args.output.suffix.lower()](smaller, example, args.output)]
    if args.onnx is not None:
        written.append(export_onnx(smaller, example, args.onnx))
    if args.sparse is not None:
        written.append(save_sparse(smaller, args.sparse))
    if state is not None:
        save_torch(state, args.state_dict)
        written.append(args.state_dict)
    print(format_summary(compaction_summary(model, smaller, tuple(shape))))
    for path in written:
        print(f"wrote {path} ({file_size(path):,} bytes)")
    return 0


# ----------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def _logging_to_stderr(verbose: int, quiet: int) -> Iterator[None]:
    """Send the ``nnrelief`` loggers to stderr while the command runs at the level of
    :func:`~nnrelief.verbosity.level_of`, the libraries' warnings with -v only
    (:func:`~nnrelief.verbosity.library_messages`), with tqdm bars kept intact; the
    previous logging setup is restored afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("nnrelief")
    saved = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(level_of(verbose, quiet))
    root.propagate = False
    try:
        shown = verbose > 0 and not quiet
        with library_messages(shown, handler), logging_redirect_tqdm(loggers=[root, logging.getLogger(WARNINGS_LOGGER)]):
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nnrelief`` command; returns the exit status (0 = success)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_preset_of(argv))
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    # torchrun: rank 0 alone prints; the other ranks log errors only (warnings with -v).
    world, launch_rank = distributed.env_world_size(), distributed.env_rank()
    if world > 1 and args.command not in _DISTRIBUTED_COMMANDS:
        parser.error(f"'{args.command}' runs in one process: start it without torchrun")
    quiet = args.quiet + (1 if launch_rank != 0 else 0)
    silent = open(os.devnull, "w") if launch_rank != 0 else None  # closed in the finally below
    with _logging_to_stderr(args.verbose, quiet), contextlib.redirect_stdout(silent or sys.stdout):
        try:
            with distributed.failing_together():
                status = args.handler(args)
            sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
            return status
        except KeyboardInterrupt:
            print("nnrelief: interrupted; run the same command again to resume", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader of stdout went away (`nnrelief ... | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except _USER_ERRORS as error:
            logger.debug("details:", exc_info=True)
            message = str(error)
            first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
            where = f"[rank {launch_rank}/{world}] " if world > 1 else ""
            print(f"nnrelief {args.command}: error: {where}{first}", file=sys.stderr)
            for line in getattr(error, "details", ()):  # an error that says more in a few lines
                print(f"  {line}", file=sys.stderr)
            return 1
        finally:
            distributed.shutdown()
            if silent is not None:
                silent.close()
