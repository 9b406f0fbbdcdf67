"""CPU inference latency and peak memory: dense vs masked vs compacted models.

LeNet-5 (MNIST) and the VGG-like net (CIFAR-10) are pruned with a few ``nnrelief.prune``
passes on real training images (alpha ~0.9), then timed at batch 1 and batch 256:

* dense     - the model before pruning;
* masked    - the pruned model as ``nnrelief.prune`` leaves it (torch pruning masks,
              ``weight = weight_orig * weight_mask`` recomputed in every forward);
* compacted - ``nnrelief.compact(...)``: removed channels physically gone.

The weights are UNTRAINED (Kaiming init; no training between passes): the timings and
sizes are what matter here, not the accuracy, and untrained nets are pruned differently
from trained ones, so the speed-ups are only indicative of the method.

Latency is the median wall time of a forward pass (torch.no_grad, eval mode). Peak
memory is the rise of the process's peak resident set size (VmHWM, reset through
/proc/self/clear_refs) during one forward pass above the resident size before it, i.e.
activations and temporaries (and, for the masked model, the weights it recomputes); n/a
where /proc does not allow the reset. So that freed blocks do not stay resident and hide
the next peak, the script re-executes itself with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed
at 64 KiB (large blocks are mmapped and returned on free).

Usage::

    python benchmarks/inference.py            # ~2-3 minutes
    python benchmarks/inference.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import nnrelief
from nnrelief import data
from nnrelief.compaction import compact
from nnrelief.metrics import summarize
from nnrelief.models import get_model, input_shape

DATASET = {"lenet5": "mnist", "vgg_like": "cifar10"}


def pruning_batches(model_name: str, data_dir: Path, samples: int, batch: int) -> list[torch.Tensor]:
    """``samples`` normalised training images of the model's dataset, in batches."""
    name = DATASET[model_name]
    train = data.load_dataset(name, data_dir, split="train", download=False)
    chosen = data.sample_pruning_set(train, samples, seed=0)
    images = data.default_normalize(name)(chosen.images)
    return list(images.split(batch))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mib(run: Callable[[], object]) -> float | None:
    """Rise of peak RSS above the current RSS while ``run()`` executes, in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) / 1024


def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median forward time in milliseconds after two warm-up calls."""
    with torch.no_grad():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_model(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    shape = input_shape(name)
    dense = get_model(name, 10).eval()
    masked = copy.deepcopy(dense)
    batches = pruning_batches(name, args.data_dir, args.samples, 128)
    start = time.perf_counter()
    for _ in range(args.passes):
        report = nnrelief.prune(masked, batches, alpha_fc=args.alpha, alpha_conv=args.alpha, score=args.score, progress=False)
    prune_s = time.perf_counter() - start
    masked.eval()
    start = time.perf_counter()
    compacted = compact(masked, batches[0][:2])
    compact_s = time.perf_counter() - start
    x_check = batches[0][:16]
    with torch.no_grad():
        diff = (masked(x_check) - compacted(x_check)).abs().max().item()
    stats = {key: summarize(model, shape) for key, model in (("dense", dense), ("masked", masked), ("compacted", compacted))}
    print(f"\n== {name} ({DATASET[name]}, untrained weights): {args.passes} passes alpha={args.alpha} "
          f"score={args.score} on {args.samples} training images: {prune_s:.1f}s; compact: {compact_s:.1f}s; "
          f"max |masked - compacted| = {diff:.2e}")
    print(f"remaining weights+biases {report.kept:,}/{report.total:,} ({report.compression:.2f}x)")
    header = f"{'model':<10} {'stored params':>14} {'dense MACs':>14} " + " ".join(
        f"{f'lat b{b} (ms)':>14} {'ratio':>6}" for b in args.batches
    ) + f" {f'peak mem b{args.batches[-1]} (MiB)':>22} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    base: dict[str, float | None] = {}
    for key, model in (("dense", dense), ("masked", masked), ("compacted", compacted)):
        cells = []
        for batch in args.batches:
            x = torch.randn(batch, *shape)
            value = latency_ms(model, x, args.repeats if batch == 1 else max(3, args.repeats // 5))
            base.setdefault(f"lat{batch}", value)
            cells.append(f"{value:>14.2f} {value / base[f'lat{batch}']:>6.2f}")
        x = torch.randn(args.batches[-1], *shape)
        with torch.no_grad():
            memory = peak_memory_mib(lambda model=model, x=x: model(x))
        base.setdefault("mem", memory)
        memory_cell = "n/a" if memory is None else f"{memory:.1f}"
        memory_ratio = f"{memory / base['mem']:.2f}" if memory is not None and base["mem"] else "n/a"
        print(f"{key:<10} {stats[key].all_params_total:>14,} {stats[key].macs_dense:>14,} {' '.join(cells)} "
              f"{memory_cell:>22} {memory_ratio:>6}")
    print(f"(ratios against dense; masked MACs counting only unpruned weights: {stats['masked'].macs_sparse:,})")


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--models", nargs="+", default=["lenet5", "vgg_like"], choices=sorted(DATASET))
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000, help="pruning set size")
    parser.add_argument("--score", default="authors", choices=["paper", "authors"], help="authors' conv score (faster)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a busy 2-core machine, OpenMP synchronisation adds ~60 ms per call)",
    )
    parser.add_argument("--quick", action="store_true", help="256 pruning samples, 2 passes, fewer repeats")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.passes, args.repeats = 256, 2, 10
    args.batches = (1, 256)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for name in args.models:
        bench_model(name, args)


if __name__ == "__main__":
    main()
