"""Cost of one NNrelief pruning pass relative to one plain forward pass.

For LeNet-300-100 and LeNet-5 on MNIST (28x28x1) and VGG-like and ResNet-20 on CIFAR-10
(32x32x3), 1,000 pruning samples in batches of 100: time of `nnrelief.prune` (both score
modes) divided by the time of one `torch.no_grad()` forward pass over the same batches,
and the extra peak memory of each (CPU: RSS above the level after loading model and data;
CUDA: peak allocated GPU memory above the same level). Every measurement runs in its own
subprocess so peak-memory readings do not mix.

    python benchmarks/prune_pass.py [--device cpu|cuda] [--samples 1000] [--batch 100] [--data-dir ../shared/data]

"ratio" is a pass on a fresh copy of the model: it captures the model (torch.export, once
per model and input signature; the batches are a list of equal batches, so for their one
shape, without a dynamic batch). "cached" is the third pass on the same model, as the
iterations of a run prune it: the capture is reused (the masks and gates a pass adds are
written into it, no second export). "per batch" leaves out the pass's
fixed cost (capture, selection, cleaning: timed as the same pass on the first batch only):
(pass - one-batch pass) / (forward - one batch's forward), the cost of streaming one more
batch relative to the forward pass.

With ``--device cuda`` model and data live on the GPU (as a training run's do) and the
clock stops after ``torch.cuda.synchronize()``; each timing is the best of ``--repeats``.

Targets: on a 2-core CPU ratio <= 3 with score="authors", <= 5 with score="paper"; on an
H100/H200 (issue 9) <= 1.5 with "authors" and <= 3 with "paper" on VGG-like, <= 3 on ResNet-20.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = [("lenet300_100", "mnist"), ("lenet5", "mnist"), ("vgg_like", "cifar10"), ("resnet20", "cifar10")]


def _load(model_name: str, dataset: str, samples: int, data_dir: str):
    import torch

    from nnrelief import data, models

    torch.manual_seed(0)
    model = models.get_model(model_name, 10).eval()
    try:
        train = data.load_dataset(dataset, data_dir, split="train", download=False)
        images = data.sample_pruning_set(train, samples, seed=0).images
        x = data.default_normalize(dataset)(images.float())
        source = "real"
    except (FileNotFoundError, ValueError):
        x = torch.rand(samples, *models.input_shape(model_name))
        source = "random (data not found)"
    return model, x, source


def _measure(model_name: str, dataset: str, what: str, samples: int, batch: int, data_dir: str,
             device_name: str, repeats: int) -> dict:
    import torch

    import nnrelief

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(2)
    model, x, source = _load(model_name, dataset, samples, data_dir)
    model, x = model.to(device), x.to(device)
    batches = list(x.split(batch))
    with torch.no_grad():
        model(batches[0])  # warm-up outside the measurement (cuDNN/cuBLAS handles, lazy init)
    if what != "forward":  # first-call costs (lazy imports, fx) are paid once per process
        nnrelief.prune(copy.deepcopy(model), batches[:1], score=what, progress=False)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # Every pass prunes the dense model: copies made before the memory baseline.
    targets = [model] + [copy.deepcopy(model) for _ in range(3 * repeats - 1)] if what != "forward" else []
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    best = float("inf")
    for repeat in range(repeats):
        sync()
        start = time.perf_counter()
        if what == "forward":
            with torch.no_grad():
                for b in batches:
                    model(b)
        else:
            nnrelief.prune(targets[repeat], batches, alpha_fc=0.95, alpha_conv=0.9, score=what, progress=False)
        sync()
        best = min(best, time.perf_counter() - start)
    one = float("inf")  # the same pass on the first batch only: its fixed cost (tracing, selection)
    for repeat in range(repeats if what != "forward" else 0):
        sync()
        start = time.perf_counter()
        nnrelief.prune(targets[repeats + repeat], batches[:1], alpha_fc=0.95, alpha_conv=0.9, score=what, progress=False)
        sync()
        one = min(one, time.perf_counter() - start)
    cached = float("inf")  # the third pass on one model: its capture reused
    for repeat in range(repeats if what != "forward" else 0):
        target = targets[2 * repeats + repeat]
        for _ in range(2):
            nnrelief.prune(target, batches, alpha_fc=0.95, alpha_conv=0.9, score=what, progress=False)
        sync()
        start = time.perf_counter()
        nnrelief.prune(target, batches, alpha_fc=0.95, alpha_conv=0.9, score=what, progress=False)
        sync()
        cached = min(cached, time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": best, "one_batch_seconds": one, "cached_seconds": cached, "batches": len(batches),
            "extra_peak_mb": (peak - baseline) / 2**20, "data": source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--models", nargs="*", default=[m for m, _ in MODELS])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timings per measurement, best kept (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--memory-scaling", action="store_true",
                        help="also: LeNet-5's extra peak memory at 20,000 against 2,000 pruning samples "
                             "(batches of 250, median of 3 runs; goal <= 1.1)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "DATASET", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.device == "cpu" else 5
    if args.one:
        print(json.dumps(_measure(*args.one, args.samples, args.batch, args.data_dir, args.device, args.repeats)))
        return
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--device {args.device}: CUDA is not available on this machine")

    def run(model_name: str, dataset: str, what: str, samples: int = args.samples, batch: int = args.batch) -> dict:
        command = [sys.executable, __file__, "--samples", str(samples), "--batch", str(batch),
                   "--data-dir", args.data_dir, "--device", args.device, "--repeats", str(args.repeats),
                   "--one", model_name, dataset, what]
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    print(f"{_device_line(args.device)}; {args.samples} samples, batches of {args.batch}; "
          "ratio = pass time / forward time")
    print("per batch = (pass - pass on the first batch only) / (forward - one batch's forward): "
          "the cost of streaming one more batch, without the pass's fixed cost")
    header = (f"{'model':<14} {'forward s':>9} {'fwd MB':>7} | {'authors s':>9} {'ratio':>6} {'cached':>6} {'per batch':>9} "
              f"{'MB':>6} | {'paper s':>8} {'ratio':>6} {'cached':>6} {'per batch':>9} {'MB':>6} | data")
    print(header)
    print("-" * len(header))
    for model_name, dataset in MODELS:
        if model_name not in args.models:
            continue
        forward = run(model_name, dataset, "forward")
        authors = run(model_name, dataset, "authors")
        paper = run(model_name, dataset, "paper")
        print(
            f"{model_name:<14} {forward['seconds']:>9.3f} {forward['extra_peak_mb']:>7.1f} | "
            f"{authors['seconds']:>9.3f} {authors['seconds'] / forward['seconds']:>6.2f} "
            f"{authors['cached_seconds'] / forward['seconds']:>6.2f} {_per_batch(authors, forward):>9.2f} "
            f"{authors['extra_peak_mb']:>6.1f} | "
            f"{paper['seconds']:>8.3f} {paper['seconds'] / forward['seconds']:>6.2f} "
            f"{paper['cached_seconds'] / forward['seconds']:>6.2f} {_per_batch(paper, forward):>9.2f} "
            f"{paper['extra_peak_mb']:>6.1f} | {forward['data']}",
            flush=True,
        )
    if args.memory_scaling:
        peaks = {n: statistics.median(run("lenet5", "mnist", "paper", n, 250)["extra_peak_mb"] for _ in range(3)) for n in (2000, 20000)}
        print(f"LeNet-5 pass, extra peak memory (median of 3): {peaks[2000]:.1f} MB at 2,000 samples, "
              f"{peaks[20000]:.1f} MB at 20,000: ratio {peaks[20000] / max(peaks[2000], 1e-9):.2f} (goal <= 1.1)")


def _per_batch(pass_: dict, forward: dict) -> float:
    batches = forward["batches"]
    if batches < 2:
        return float("nan")
    return (pass_["seconds"] - pass_["one_batch_seconds"]) / (forward["seconds"] * (batches - 1) / batches)


def _device_line(device: str) -> str:
    import torch

    if device == "cpu":
        return f"device cpu (2 threads), torch {torch.__version__}"
    return f"device {torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"


if __name__ == "__main__":
    main()
