"""CIFAR-100 and Tiny-ImageNet, which cannot be downloaded here, proved on files written in
exactly their original formats: the readers, ``load_dataset`` and the paper's experiments
from the command line.

The fixtures write the distributions' real layout and pickle structure; only the number of
images is smaller, so the registry's expected sample counts are patched to the fixtures'.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nnrelief import data
from nnrelief.cli import main
from nnrelief.data import registry

RUN = [
    "--epochs", "1", "--retrain-epochs", "1", "--num-iters", "1", "--batch-size", "50",
    "--device", "cpu", "--no-progress", "--threads", "1", "-q",
]  # fmt: skip


def write_cifar100(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, dict]:
    """``cifar-100-python/{train,test,meta}`` as in cifar-100-python.tar.gz: protocol-2
    pickles with byte-string keys, fine and coarse labels, file names and batch labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    batches = {}
    for split, n in counts.items():
        fine = rng.integers(0, 100, n)
        batch = {
            b"filenames": [f"image_{split}_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
        batches[split] = batch
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}  # fmt: skip
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def write_tiny_imagenet(root: Path, per_class: int, val_per_class: int, val_classes: int = 200) -> list[str]:
    """``tiny-imagenet-200`` as in tiny-imagenet-200.zip: wnids.txt, words.txt,
    train/<wnid>/<wnid>_boxes.txt + images/<wnid>_<i>.JPEG, val/val_annotations.txt +
    images/val_<i>.JPEG (for the first ``val_classes`` classes), test/images/test_<i>.JPEG.
    Every class has its own colour."""
    image = pytest.importorskip("PIL.Image")
    top = root / "tiny-imagenet-200"
    wnids = [f"n{1440764 + 7 * i:08d}" for i in range(200)]
    (top / "val" / "images").mkdir(parents=True)
    (top / "test" / "images").mkdir(parents=True)
    (top / "wnids.txt").write_text("".join(f"{w}\n" for w in reversed(wnids)))  # not sorted in the file
    (top / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    annotations = []
    for c, wnid in enumerate(wnids):
        colour = (c % 256, (7 * c) % 256, 255 - c % 256)
        images = top / "train" / wnid / "images"
        images.mkdir(parents=True)
        (top / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
        for i in range(per_class):
            image.new("RGB", (64, 64), colour).save(images / f"{wnid}_{i}.JPEG", quality=95)
        for i in range(val_per_class if c < val_classes else 0):
            name = f"val_{c * val_per_class + i}.JPEG"
            image.new("RGB", (64, 64), colour).save(top / "val" / "images" / name, quality=95)
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (top / "val" / "val_annotations.txt").write_text("".join(annotations))
    image.new("RGB", (64, 64), (0, 0, 0)).save(top / "test" / "images" / "test_0.JPEG")
    return wnids


def patch_counts(monkeypatch, name: str, counts: dict[str, int]) -> None:
    spec = dataclasses.replace(registry.DATASETS[name], num_samples=counts)
    monkeypatch.setitem(registry.DATASETS, name, spec)


def run_folder(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir() and p.name != "dense"]  # beside it: the shared dense model
    return folder


def test_cifar100_original_format(tmp_path, monkeypatch):
    counts = {"train": 300, "test": 60}
    batches = write_cifar100(tmp_path, counts)
    with pytest.raises(data.DataFormatError, match="300 samples, the distribution has 50000"):
        data.load_dataset("cifar100", tmp_path, "train", download=False)
    patch_counts(monkeypatch, "cifar100", counts)
    for split in ("train", "test"):
        loaded = data.load_dataset("cifar100", tmp_path, split, download=False)
        raw = batches[split]
        assert loaded.num_classes == 100 and loaded.images.shape == (counts[split], 3, 32, 32)
        assert loaded.labels.tolist() == raw[b"fine_labels"]  # fine, not coarse, labels
        assert np.array_equal(loaded.images.numpy(), raw[b"data"].reshape(-1, 3, 32, 32))


def test_paper_cifar100_experiment_runs(tmp_path, monkeypatch, capsys):
    patch_counts(monkeypatch, "cifar100", {"train": 300, "test": 60})
    write_cifar100(tmp_path / "data", {"train": 300, "test": 60})
    runs = tmp_path / "runs"
    # the paper's ResNet-56 preset with a ResNet-20 (same family, a third of the depth) for speed
    args = ["prune", "--preset", "resnet56-cifar100", "--model", "resnet20", "--data-dir", str(tmp_path / "data"),
            *RUN, "--val-size", "100", "--prune-samples", "100", "--runs-root", str(runs)]  # fmt: skip
    assert main(args) == 0
    folder = run_folder(runs)
    assert folder.name.startswith("resnet56-cifar100-")
    config = json.loads((folder / "config.json").read_text())
    assert (config["model"], config["dataset"], config["prune_samples"]) == ("resnet20", "cifar100", 100)
    assert config["optimizer"] == "adam" and config["milestones"] == [120, 160]  # the preset's settings
    history = json.loads((folder / "history.json").read_text())
    assert len(history["iterations"]) == 2
    assert history["iterations"][1]["params_remaining"] < history["iterations"][0]["params_total"]
    assert "resnet56-cifar100-" in capsys.readouterr().out


def test_tiny_imagenet_original_layout(tmp_path, monkeypatch):
    wnids = write_tiny_imagenet(tmp_path, per_class=2, val_per_class=1)
    patch_counts(monkeypatch, "tiny-imagenet", {"train": 400, "test": 200})
    train = data.load_dataset("tiny-imagenet", tmp_path, "train", download=False)
    test = data.load_dataset("tiny-imagenet", tmp_path, "test", download=False)  # the labelled val folder
    assert train.num_classes == 200 and train.images.shape == (400, 3, 64, 64)
    assert test.images.shape == (200, 3, 64, 64)
    order = sorted(wnids)  # class indices follow the sorted wnids, as torchvision's ImageFolder
    assert train.labels.tolist() == [c for c in range(200) for _ in range(2)]
    for dataset in (train, test):
        for index in (0, len(dataset) - 1):
            c = wnids.index(order[int(dataset.labels[index])])
            colour = torch.tensor([c % 256, (7 * c) % 256, 255 - c % 256], dtype=torch.float32)
            mean = dataset.images[index].float().mean(dim=(1, 2))
            assert torch.allclose(mean, colour, atol=3), (index, mean, colour)  # JPEG rounding


def test_tiny_imagenet_experiment_runs(tmp_path, monkeypatch, capsys):
    write_tiny_imagenet(tmp_path / "data", per_class=1, val_per_class=1, val_classes=10)
    patch_counts(monkeypatch, "tiny-imagenet", {"train": 200, "test": 10})
    runs = tmp_path / "runs"
    args = ["prune", "--model", "resnet18_tiny", "--dataset", "tiny-imagenet", "--data-dir", str(tmp_path / "data"),
            *RUN, "--optimizer", "sgd", "--lr", "0.05", "--train-subset", "50", "--val-size", "20",
            "--prune-samples", "20", "--score", "authors", "--runs-root", str(runs)]  # fmt: skip
    assert main(args) == 0
    history = json.loads((run_folder(runs) / "history.json").read_text())
    assert len(history["iterations"]) == 2 and history["iterations"][1]["params_remaining"] > 0
    assert "test" in history["iterations"][1]["accuracy_after"]
