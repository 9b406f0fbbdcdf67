"""Training throughput: nnrelief's ``fit`` against a minimal plain-PyTorch loop.

Both train the same pruned (masked) VGG-like net on the same batches: CIFAR-10 training
images from ``--data-dir`` when present (else random pixels of the same shape), kept on
the device as uint8 and augmented there by ``nnrelief.data.BatchLoader``, batch 120,
Adam, with a validation pass after every epoch. The plain loop uses the same speed
settings as ``fit`` (autocast dtype, channels_last and cuDNN benchmark mode on CUDA, the
fused optimizer), so the ratio measures what ``fit`` adds: progress bars, on-device loss
and accuracy sums, best-epoch bookkeeping. Epoch time = training + validation; the first
epoch (cuDNN autotuning, allocator warm-up) is left out; images/s = training images per
second over the remaining epochs. Without ``--quick`` the dense model is timed with
``fit`` too (issue 9: a masked model should train at >= 0.95x the dense speed).

Clock: on CUDA wall time after ``torch.cuda.synchronize()``; on the CPU this process's
CPU time (one thread by default), so that other programs competing for the cores do not
decide the ratio.

    python benchmarks/train_epoch.py --device cuda            # 45k images, bf16
    python benchmarks/train_epoch.py --device cpu --quick     # about a minute of CPU time

The last line is exactly ``fit/plain throughput ratio: X.XX`` (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import nnrelief
from nnrelief import data as nndata
from nnrelief.models import get_model
from nnrelief.training import TrainConfig, fit, make_optimizer


def _dataset(data_dir: str, samples: int) -> tuple[nndata.TensorDataset, str]:
    try:
        train = nndata.load_dataset("cifar10", data_dir, split="train", download=False)
        chosen = nndata.sample_pruning_set(train, min(samples, len(train)), seed=0)
        return chosen, "CIFAR-10"
    except (FileNotFoundError, ValueError):
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (samples, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (samples,), generator=generator)
        return nndata.TensorDataset(images, labels, 10, "cifar10", split="train"), "random pixels (CIFAR-10 not found)"


def _masked_model(device: torch.device, loader: nndata.BatchLoader) -> nn.Module:
    torch.manual_seed(0)
    model = get_model("vgg_like", 10).to(device)
    prune_batches = [x for _, (x, _y) in zip(range(4), loader)]
    nnrelief.prune(model, prune_batches, alpha_fc=0.9, alpha_conv=0.9, progress=False)
    return model


def _clock(device: torch.device) -> float:
    """Seconds: wall time once the GPU is done, or this process's CPU time on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def _plain_epochs(model: nn.Module, train: nndata.BatchLoader, val: nndata.BatchLoader, cfg: TrainConfig,
                  device: torch.device) -> list[float]:
    """Seconds per epoch of the textbook loop (train, then validate) with fit's speed settings."""
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(model, cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if cuda and cfg.amp == "fp16" else None
    autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if cuda and dtype is not None else None
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    seconds = []
    for epoch in range(cfg.epochs):
        start = _clock(device)
        train.set_epoch(epoch)
        model.train()
        for x, y in train:
            x = x.contiguous(memory_format=memory_format)
            optimizer.zero_grad(set_to_none=True)
            with autocast() if autocast else torch.enable_grad():
                loss = F.cross_entropy(model(x).float(), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=device)
        with torch.no_grad():
            for x, y in val:
                with autocast() if autocast else torch.no_grad():
                    correct += (model(x.contiguous(memory_format=memory_format)).argmax(1) == y).sum()
        correct.item()
        seconds.append(_clock(device) - start)
    return seconds


def _fit_epochs(model: nn.Module, train: nndata.BatchLoader, val: nndata.BatchLoader, cfg: TrainConfig,
                device: torch.device) -> list[float]:
    seconds: list[float] = []
    last = [_clock(device)]

    def tick(_record: object) -> None:  # time between epoch ends (fit's own bookkeeping included)
        now = _clock(device)
        seconds.append(now - last[0])
        last[0] = now

    fit(model, train, val, cfg, progress=False, on_epoch_end=tick, desc="benchmark")
    return seconds


def _profile(model: nn.Module, train: nndata.BatchLoader, val: nndata.BatchLoader, cfg: TrainConfig,
             device: torch.device, path: Path) -> None:
    """Where one fit epoch spends its time (after a warm-up epoch), as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    fit(model, train, val, TrainConfig(**{**cfg.to_dict(), "epochs": 1}), progress=False)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fit(model, train, val, TrainConfig(**{**cfg.to_dict(), "epochs": 1}), progress=False)
        _clock(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
    print(f"profile of one fit epoch written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="few images and epochs, no dense comparison")
    parser.add_argument("--samples", type=int, default=None, help="training images (default 45000; quick: 240)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per loop, first left out (default 4; quick: 3)")
    parser.add_argument("--batch-size", type=int, default=120)
    parser.add_argument("--amp", default=None, help="off, bf16 or fp16 (default: bf16 on CUDA, off on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="also profile one fit epoch with torch.profiler and write its op table to FILE")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
    samples = args.samples or (240 if args.quick else 45000)
    epochs = args.epochs or (3 if args.quick else 4)
    if epochs < 2:
        sys.exit("--epochs must be >= 2 (the first epoch is left out)")
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    dataset, source = _dataset(args.data_dir, samples + max(samples // 9, args.batch_size))
    train_set = nndata.subset(dataset, torch.arange(samples))
    val_set = nndata.subset(dataset, torch.arange(samples, len(dataset)))
    train = nndata.BatchLoader(train_set, args.batch_size, shuffle=True, seed=0, device=device, augment=True)
    val = nndata.BatchLoader(val_set, 500, shuffle=False, seed=0, device=device)
    cfg = TrainConfig(optimizer="adam", lr=1e-3, epochs=epochs, device=str(device), amp=amp, seed=0)
    masked = _masked_model(device, train)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}; VGG-like, {samples} training images ({source}), "
          f"{len(val_set)} validation, batch {args.batch_size}, amp {amp}, {epochs} epochs (first left out), "
          f"{'wall' if device.type == 'cuda' else 'process CPU'} time")
    results = {}
    runs = [("fit, masked", _fit_epochs, masked), ("plain loop, masked", _plain_epochs, masked)]
    if not args.quick:
        torch.manual_seed(0)
        runs.append(("fit, dense", _fit_epochs, get_model("vgg_like", 10).to(device)))
    for label, run, model in runs:
        seconds = run(copy.deepcopy(model), train, val, cfg, device)
        epoch = statistics.median(seconds[1:])
        results[label] = samples / epoch
        print(f"{label:<20} epoch {epoch:7.3f} s (median; all: {', '.join(f'{s:.2f}' for s in seconds)})"
              f"  {results[label]:10.1f} images/s")
    if args.profile:
        _profile(copy.deepcopy(masked), train, val, cfg, device, Path(args.profile))
    if "fit, dense" in results:
        print(f"masked/dense fit throughput ratio: {results['fit, masked'] / results['fit, dense']:.2f}")
    print(f"fit/plain throughput ratio: {results['fit, masked'] / results['plain loop, masked']:.2f}")


if __name__ == "__main__":
    main()
