"""Cost of one NNrelief pruning pass relative to one plain forward pass.

For LeNet-300-100 and LeNet-5 on MNIST (28x28x1) and VGG-like and ResNet-20 on CIFAR-10
(32x32x3), 1,000 pruning samples in batches of 100: time of `nnrelief.prune` (both score
modes) divided by the time of one `torch.no_grad()` forward pass over the same batches,
and the extra peak memory (RSS above the level after loading model and data) of each.
Every measurement runs in its own subprocess so peak-memory readings do not mix.

    python benchmarks/prune_pass.py [--samples 1000] [--batch 100] [--data-dir ../shared/data]

Targets on a 2-core CPU: ratio <= 3 with score="authors", <= 5 with score="paper".
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
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


def _measure(model_name: str, dataset: str, what: str, samples: int, batch: int, data_dir: str) -> dict:
    import torch

    import nnrelief

    torch.set_num_threads(2)
    model, x, source = _load(model_name, dataset, samples, data_dir)
    batches = list(x.split(batch))
    with torch.no_grad():
        model(batches[0])  # warm-up outside the measurement
    if what != "forward":  # first-call costs (lazy imports, fx) are paid once per process
        nnrelief.prune(copy.deepcopy(model), batches[:1], score=what, progress=False)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if what == "forward":
        with torch.no_grad():
            for b in batches:
                model(b)
    else:
        nnrelief.prune(model, batches, alpha_fc=0.95, alpha_conv=0.9, score=what, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "extra_peak_mb": (peak - baseline) / 1024.0, "data": source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--models", nargs="*", default=[m for m, _ in MODELS])
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "DATASET", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_measure(*args.one, args.samples, args.batch, args.data_dir)))
        return

    def run(model_name: str, dataset: str, what: str) -> dict:
        command = [sys.executable, __file__, "--samples", str(args.samples), "--batch", str(args.batch),
                   "--data-dir", args.data_dir, "--one", model_name, dataset, what]
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    print(f"{args.samples} samples, batches of {args.batch}; ratio = pass time / forward time")
    header = f"{'model':<14} {'forward s':>9} {'fwd MB':>7} | {'authors s':>9} {'ratio':>6} {'MB':>6} | {'paper s':>8} {'ratio':>6} {'MB':>6} | data"
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
            f"{authors['seconds']:>9.3f} {authors['seconds'] / forward['seconds']:>6.2f} {authors['extra_peak_mb']:>6.1f} | "
            f"{paper['seconds']:>8.3f} {paper['seconds'] / forward['seconds']:>6.2f} {paper['extra_peak_mb']:>6.1f} | {forward['data']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
