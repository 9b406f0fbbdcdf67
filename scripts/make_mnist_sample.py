"""Cut the small MNIST sample shipped in ``src/nnrelief/data/sample/``.

Takes the first ``--train`` training and first ``--test`` test images of the original
MNIST files (md5-verified by ``nnrelief.data.load_dataset``) and writes them as
gzip-compressed IDX files, deterministically (gzip mtime 0), plus a README.

    python scripts/make_mnist_sample.py --source /path/to/dir/with/mnist
"""

from __future__ import annotations

import argparse
import gzip
import logging
import struct
from pathlib import Path

import numpy as np

from nnrelief.data import load_dataset, md5sum

logger = logging.getLogger("make_mnist_sample")

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

README = """\
# MNIST sample (offline demo data)

Source: the MNIST database of handwritten digits, Y. LeCun, C. Cortes, C. J. C. Burges,
http://yann.lecun.com/exdb/mnist/ . License: Creative Commons Attribution-Share Alike 3.0
(CC BY-SA 3.0). This sample is a subset of it and is distributed under the same license.

How it was cut (`scripts/make_mnist_sample.py`): the first {n_train} images/labels of the
original training files and the first {n_test} of the original test (t10k) files, read
from the original gzip IDX files after checking their published md5s. Pixels and labels
are unchanged; they are written in the same IDX format (uint8, only the sample count in
the header differs) and gzip-compressed (level 9, mtime 0), so the build is reproducible.
Load with `nnrelief.data.load_dataset("mnist-sample", split="train" | "test")`.

Class counts (digits 0-9):
- train: {train_counts}
- test: {test_counts}

| file | bytes | md5 |
|---|---|---|
{table}
"""


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed IDX file (type code 0x08)."""
    header = struct.pack(">4B", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with open(path, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0
    ) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True,
                        help="directory holding the original MNIST .gz files "
                             "(directly or in a mnist/ subfolder)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "src/nnrelief/data/sample")
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    args.out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, n in (("train", args.train), ("test", args.test)):
        data = load_dataset("mnist", args.source, split=split, download=False)
        images = data.images[:n, 0].numpy()
        labels = data.labels[:n].to(dtype=data.images.dtype).numpy()
        counts[split] = np.bincount(labels, minlength=10).tolist()
        logger.info("%s: %d samples, class counts %s", split, n, counts[split])
        for name, array in zip(FILES[split], (images, labels)):
            write_idx_gz(args.out / name, array)

    table = "\n".join(
        f"| {name} | {(args.out / name).stat().st_size} | {md5sum(args.out / name)} |"
        for split in FILES for name in FILES[split]
    )
    (args.out / "README.md").write_text(README.format(
        n_train=args.train, n_test=args.test, train_counts=counts["train"],
        test_counts=counts["test"], table=table))
    total = sum((args.out / name).stat().st_size for names in FILES.values() for name in names)
    logger.info("wrote %s (%d bytes of IDX .gz)", args.out, total)


if __name__ == "__main__":
    main()
