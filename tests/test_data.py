"""Tests of nnrelief.data: readers, registry, batching, splits, shipped sample, real data."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nnrelief import data
from nnrelief.data import (
    BatchLoader,
    ChecksumError,
    DataFormatError,
    DatasetNotFoundError,
    Normalize,
    TensorDataset,
)

MNIST_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# ---------------------------------------------------------------- writers of original formats

def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">4B", 0, 0, type_code, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(">u1").tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def random_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


def write_cifar_pickle(path: Path, images: np.ndarray, labels: list[int],
                       label_key: bytes = b"labels") -> None:
    """Like the originals: a Python-2 protocol-2 pickle of a dict with bytes keys."""
    batch = {b"batch_label": b"test batch", label_key: labels,
             b"data": images.reshape(len(images), -1),
             b"filenames": [b"img%d.png" % i for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def make_cifar10_dir(root: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A tiny cifar-10-batches-py directory; returns all train images and labels."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        write_cifar_pickle(root / name, x, y)
        if name != "test_batch":
            images.append(x)
            labels += y
    return np.concatenate(images), np.array(labels)


def random_dataset(n: int = 50, shape: tuple[int, ...] = (3, 8, 8), name: str = "cifar10",
                   split: str | None = "train") -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g),
                         torch.arange(n) % 10, 10, name, split)


# ---------------------------------------------------------------- MNIST IDX reader

@pytest.mark.parametrize("compress", [True, False])
def test_read_mnist_idx(tmp_path: Path, compress: bool) -> None:
    x, y = random_mnist(7)
    ds = data.read_mnist(write_idx(tmp_path / "img", x, compress),
                         write_idx(tmp_path / "lab", y, compress), split="train")
    assert ds.images.shape == (7, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10
    assert np.array_equal(ds.images[:, 0].numpy(), x)
    assert np.array_equal(ds.labels.numpy(), y)


def test_read_idx_truncated_data(tmp_path: Path) -> None:
    x, _ = random_mnist(5)
    path = tmp_path / "img"
    path.write_bytes(idx_bytes(x)[:-100])
    with pytest.raises(DataFormatError, match="truncated") as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    x, _ = random_mnist(5)
    path = tmp_path / "img.gz"
    path.write_bytes(gzip.compress(idx_bytes(x))[:-200])
    with pytest.raises(DataFormatError, match="gzip") as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_trailing_bytes_and_short_header(tmp_path: Path) -> None:
    x, _ = random_mnist(2)
    (tmp_path / "a").write_bytes(idx_bytes(x) + b"\0")
    with pytest.raises(DataFormatError, match="trailing"):
        data.read_idx(tmp_path / "a")
    (tmp_path / "b").write_bytes(idx_bytes(x)[:9])
    with pytest.raises(DataFormatError, match="truncated IDX header"):
        data.read_idx(tmp_path / "b")


def test_read_idx_wrong_magic(tmp_path: Path) -> None:
    x, _ = random_mnist(2)
    path = tmp_path / "img.gz"
    path.write_bytes(gzip.compress(b"\x12\x34" + idx_bytes(x)[2:]))
    with pytest.raises(DataFormatError, match="magic") as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_read_mnist_rejects_swapped_or_mismatched_files(tmp_path: Path) -> None:
    x, y = random_mnist(4)
    img, lab = write_idx(tmp_path / "img", x), write_idx(tmp_path / "lab", y)
    with pytest.raises(DataFormatError, match="shape"):
        data.read_mnist(lab, img)
    write_idx(tmp_path / "lab3", y[:3])
    with pytest.raises(DataFormatError, match="4 images but .* 3 labels"):
        data.read_mnist(img, tmp_path / "lab3")


# ---------------------------------------------------------------- CIFAR pickle readers

def test_read_cifar10(tmp_path: Path) -> None:
    images, labels = make_cifar10_dir(tmp_path / "c10")
    train = data.read_cifar10(tmp_path / "c10", "train")
    test = data.read_cifar10(tmp_path / "c10", "test")
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 4
    assert train.num_classes == 10 and train.split == "train" and test.split == "test"
    assert np.array_equal(train.images.numpy(), images)  # channel-major rows -> (C, H, W)
    assert np.array_equal(train.labels.numpy(), labels)


def test_read_cifar100_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": [99 - i for i in range(n)], b"coarse_labels": [0] * n}
        (root / split).write_bytes(pickle.dumps(batch, protocol=2))
    train = data.read_cifar100(root, "train")
    assert train.num_classes == 100 and train.labels.tolist() == [99, 98, 97, 96, 95, 94]
    assert len(data.read_cifar100(root, "test")) == 3


def test_bad_cifar_pickles(tmp_path: Path) -> None:
    x = np.zeros((2, 3, 32, 32), np.uint8)
    cases = {}
    (tmp_path / "garbage").write_bytes(b"this is not a pickle")
    cases["garbage"] = "not a valid CIFAR python pickle"
    write_cifar_pickle(tmp_path / "full", x, [1, 2])
    (tmp_path / "truncated").write_bytes((tmp_path / "full").read_bytes()[:3000])
    cases["truncated"] = "not a valid CIFAR python pickle"
    write_cifar_pickle(tmp_path / "labels", x, [1])
    cases["labels"] = "2 images but 'labels'"
    write_cifar_pickle(tmp_path / "range", x, [1, 10])
    cases["range"] = "outside"
    (tmp_path / "shape").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                   b"labels": [0, 0]}, protocol=2))
    cases["shape"] = "shape"
    (tmp_path / "nokey").write_bytes(pickle.dumps({b"data": x.reshape(2, -1)}, protocol=2))
    cases["nokey"] = "missing key 'labels'"
    for name, message in cases.items():
        with pytest.raises(DataFormatError, match=message) as err:
            data.read_cifar_batch(tmp_path / name, "labels", 10)
        assert str(tmp_path / name) in str(err.value)


class _Exploit:
    def __reduce__(self):  # noqa: ANN204 - runs code when unpickled by a plain pickle.load
        return (Path.touch, (Path("/nonexistent-dir/pwned"),))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": _Exploit()}, protocol=2))
    with pytest.raises(DataFormatError, match="refusing to load global"):
        data.read_cifar_batch(tmp_path / "evil", "labels", 10)


# ---------------------------------------------------------------- Tiny-ImageNet reader

def test_read_tiny_imagenet(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # class indices follow the sorted wnids
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    colour = {"n01": (255, 0, 0), "n02": (0, 0, 255)}
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(3):
            image_module.new("RGB", (64, 64), colour[wnid]).save(folder / f"{wnid}_{i}.JPEG")
    image_module.new("L", (64, 64), 128).save(root / "val" / "images" / "val_0.JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")

    train = data.read_tiny_imagenet(root, "train")
    assert train.images.shape == (6, 3, 64, 64) and train.num_classes == 2
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images[0, 0].float().mean() > 200 and train.images[3, 2].float().mean() > 200
    test = data.read_tiny_imagenet(root, "test")  # greyscale JPEG converted to RGB
    assert test.images.shape == (1, 3, 64, 64) and test.labels.tolist() == [1]

    (root / "train" / "n01" / "images" / "n01_0.JPEG").write_bytes(b"\xff\xd8broken")
    with pytest.raises(DataFormatError, match="n01_0.JPEG"):
        data.read_tiny_imagenet(root, "train")


# ---------------------------------------------------------------- registry / load_dataset

def test_missing_files_without_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        data.load_dataset("cifar10", tmp_path, "train", download=False)
    message = str(err.value)
    assert "data_batch_1" in message and "data_batch_5" in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte.gz") as err:
        data.load_dataset("mnist", tmp_path, "test", download=False)
    assert "ossci-datasets" in str(err.value) or "yann.lecun.com" in str(err.value)


def test_mnist_md5_mismatch(tmp_path: Path) -> None:
    x, y = random_mnist(3)
    (tmp_path / "mnist").mkdir()
    for name, array in zip(MNIST_NAMES["train"], (x, y)):
        write_idx(tmp_path / "mnist" / name, array)
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz.*md5"):
        data.load_dataset("mnist", tmp_path, "train", download=False)


def test_download_from_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole download path (fetch, md5, extract, atomic install) with a file:// URL."""
    source = tmp_path / "source"
    make_cifar10_dir(source / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    spec = data.get_spec("cifar10")

    def patch(checksum: str) -> None:
        download = dataclasses.replace(spec.downloads[0], urls=(archive.as_uri(),), md5=checksum)
        monkeypatch.setitem(data.DATASETS, "cifar10", dataclasses.replace(
            spec, downloads=(download,), num_samples={"train": 20, "test": 4}))

    patch("0" * 32)
    target = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError, match="Download failed.*md5"):
        data.load_dataset("cifar10", target, "train")
    assert [p.name for p in target.iterdir()] == []  # nothing half-installed

    patch(md5)
    train = data.load_dataset("cifar10", target, "train")
    assert len(train) == 20 and train.images.shape[1:] == (3, 32, 32)
    assert [p.name for p in target.iterdir()] == ["cifar-10-batches-py"]
    assert len(data.load_dataset("cifar10", target, "test", download=False)) == 4


def test_download_files_falls_back_to_mirror(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, array in zip(MNIST_NAMES["test"], random_mnist(5)):
        write_idx(mirror / name, array)
    spec = data.get_spec("mnist")
    downloads = tuple(
        dataclasses.replace(d, urls=((tmp_path / "gone" / d.filename).as_uri(),
                                     (mirror / d.filename).as_uri()),
                            md5=data.md5sum(mirror / d.filename))
        for d in spec.downloads if d.filename in MNIST_NAMES["test"])
    monkeypatch.setitem(data.DATASETS, "mnist", dataclasses.replace(
        spec, downloads=downloads, num_samples={"train": 60000, "test": 5}))
    test = data.load_dataset("mnist", tmp_path / "data", "test")
    assert len(test) == 5
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == \
        sorted(MNIST_NAMES["test"])


def test_load_dataset_rejects_partial_dataset(tmp_path: Path) -> None:
    make_cifar10_dir(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DataFormatError, match="20 samples.*50000"):
        data.load_dataset("cifar10", tmp_path, "train", download=False)


def test_shipped_sample() -> None:
    train = data.load_dataset("mnist-sample", split="train")
    test = data.load_dataset("mnist-sample", split="test")
    assert train.images.shape == (6000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert (train.class_counts() > 0).all() and (test.class_counts() > 0).all()
    assert train.class_counts().min() > 400  # balanced enough for a demo


# ---------------------------------------------------------------- transforms and BatchLoader

def test_batch_shapes_and_len() -> None:
    ds = random_dataset(50)
    loader = BatchLoader(ds, 16, shuffle=True, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    dropped = BatchLoader(ds, 16, shuffle=True, seed=0, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 3


def test_epoch_determinism_and_coverage() -> None:
    ds = TensorDataset(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.arange(40), 40, "x")
    loader = BatchLoader(ds, 8, shuffle=True, seed=3, normalize=Normalize())

    def order(epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    assert sorted(order(0)) == list(range(40))  # every sample exactly once
    assert order(0) == order(0)
    assert order(1) != order(0)
    resumed = BatchLoader(ds, 8, shuffle=True, seed=3, normalize=Normalize())
    resumed.set_epoch(1)
    assert torch.cat([y for _, y in resumed]).tolist() == order(1)
    other_seed = BatchLoader(ds, 8, shuffle=True, seed=4, normalize=Normalize())
    assert torch.cat([y for _, y in other_seed]).tolist() != order(0)
    unshuffled = BatchLoader(ds, 8, shuffle=False, seed=3, normalize=Normalize())
    assert torch.cat([y for _, y in unshuffled]).tolist() == list(range(40))


def test_augmentation_reproducible_and_changes_content() -> None:
    ds = random_dataset(64, (3, 32, 32))
    loader = BatchLoader(ds, 64, shuffle=False, seed=0, augment=True)
    plain = BatchLoader(ds, 64, shuffle=False, seed=0, augment=False)
    (xa, ya), (xp, yp) = next(iter(loader)), next(iter(plain))
    assert xa.shape == xp.shape == (64, 3, 32, 32) and torch.equal(ya, yp)
    changed = (xa != xp).flatten(1).any(1)
    assert changed.float().mean() > 0.9  # 1/162 chance per sample of identity
    assert torch.equal(next(iter(loader))[0], xa)
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], xa)


def test_random_crop_flip_matches_reference() -> None:
    """Each output is one crop of the zero-padded input, flipped or not."""
    x = torch.randint(0, 256, (12, 2, 6, 5), dtype=torch.uint8)
    out = data.random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        candidates = [(padded[i, :, dy:dy + 6, dx:dx + 5], f) for dy in range(5)
                      for dx in range(5) for f in (False, True)]
        matches = [f for crop, f in candidates
                   if torch.equal(out[i], crop.flip(-1) if f else crop)]
        assert matches, f"sample {i} is not a crop of the padded input"
        flips += matches[0]
    assert 0 < flips < len(x)
    only_flip = data.random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    for i in range(len(x)):
        assert torch.equal(only_flip[i], x[i]) or torch.equal(only_flip[i], x[i].flip(-1))


def test_normalisation_values() -> None:
    pixels = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.allclose(Normalize()(pixels).flatten(), torch.tensor([0.0, 1.0, 0.2]))
    rgb = data.get_spec("cifar10").normalize(pixels).flatten()
    expected = (torch.tensor([0.0, 1.0, 0.2]) - torch.tensor(data.IMAGENET_MEAN)) \
        / torch.tensor(data.IMAGENET_STD)
    assert torch.allclose(rgb, expected, atol=1e-6)
    ds = TensorDataset(torch.full((2, 1, 2, 2), 255, dtype=torch.uint8), torch.zeros(2).long(),
                       10, "mnist")
    x, _ = next(iter(BatchLoader(ds, 2, shuffle=False, seed=0)))  # registry default: /255
    assert torch.equal(x, torch.ones(2, 1, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        data.get_spec("cifar10").normalize(ds.images)


def test_registry_defaults() -> None:
    assert data.get_spec("cifar10").augment and data.get_spec("tiny-imagenet").augment
    assert not data.get_spec("mnist").augment
    assert data.get_spec("mnist").normalize == Normalize()
    assert data.get_spec("tiny-imagenet").val_size == 10000
    with pytest.raises(KeyError, match="known"):
        data.get_spec("imagenet")


# ---------------------------------------------------------------- splits

def test_train_val_split() -> None:
    ds = TensorDataset(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100) % 10,
                       10, "cifar10", "train")
    train, val = data.train_val_split(ds, val_size=30, seed=1)
    assert (len(train), len(val), train.split, val.split) == (70, 30, "train", "val")
    ds_ids = TensorDataset(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1),
                           torch.zeros(100).long(), 10, "cifar10", "train")
    tr, va = data.train_val_split(ds_ids, val_size=30, seed=1)
    tr_ids, va_ids = set(tr.images.flatten().tolist()), set(va.images.flatten().tolist())
    assert not tr_ids & va_ids and len(tr_ids | va_ids) == 100
    _, va_again = data.train_val_split(ds_ids, val_size=30, seed=1)
    _, va_other = data.train_val_split(ds_ids, val_size=30, seed=2)
    assert torch.equal(va_again.images, va.images) and not torch.equal(va_other.images, va.images)
    big = random_dataset(6000, (1, 1, 1), name="mnist")
    assert [len(p) for p in data.train_val_split(big)] == [1000, 5000]  # registry default
    with pytest.raises(ValueError, match="test split"):
        data.train_val_split(random_dataset(10, split="test"), 2)
    with pytest.raises(ValueError, match="val_size"):
        data.train_val_split(ds, 100)


def test_subset_and_pruning_set() -> None:
    ds = TensorDataset(torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1),
                       torch.arange(50) % 10, 10, "mnist", "train")
    sub = data.subset(ds, [3, 1, 4])
    assert sub.images.flatten().tolist() == [3, 1, 4] and sub.labels.tolist() == [3, 1, 4]
    with pytest.raises(IndexError):
        data.subset(ds, [50])
    a = data.sample_pruning_set(ds, 20, seed=5)
    b = data.sample_pruning_set(ds, 20, seed=5)
    c = data.sample_pruning_set(ds, 20, seed=6)
    assert len(a) == 20 and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert len(set(a.images.flatten().tolist())) == 20
    with pytest.raises(ValueError, match="training data"):
        data.sample_pruning_set(dataclasses.replace(ds, split="test"), 5)


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def real_mnist(shared_data_dir: Path) -> dict[str, TensorDataset]:
    return {s: data.load_dataset("mnist", shared_data_dir, s, download=False)
            for s in ("train", "test")}


def test_real_mnist(real_mnist: dict[str, TensorDataset], shared_data_dir: Path) -> None:
    train, test = real_mnist["train"], real_mnist["test"]
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert int(train.class_counts()[1]) == 6742 and int(test.class_counts()[1]) == 1135
    assert train.class_counts().sum() == 60000
    for name in MNIST_NAMES["train"] + MNIST_NAMES["test"]:  # load_dataset checked these too
        expected = data.get_spec("mnist").file_md5[name]
        assert data.md5sum(shared_data_dir / "mnist" / name) == expected
    direct = data.load_dataset("mnist", shared_data_dir / "mnist", "test", download=False)
    assert torch.equal(direct.images, test.images)  # data_dir/*.gz layout too
    pruning = data.sample_pruning_set(train, 1000, seed=0)
    x, y = next(iter(BatchLoader(pruning, 1000, shuffle=False, seed=0)))
    assert x.shape == (1000, 1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_real_cifar10(shared_data_dir: Path) -> None:
    train = data.load_dataset("cifar10", shared_data_dir, "train", download=False)
    test = data.load_dataset("cifar10", shared_data_dir, "test", download=False)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.class_counts().tolist() == [5000] * 10
    assert test.class_counts().tolist() == [1000] * 10
    loader = BatchLoader(train, 512, shuffle=True, seed=0, augment=True)
    x, y = next(iter(loader))
    assert x.shape == (512, 3, 32, 32) and abs(float(x.mean())) < 1.0
