"""Fashion-MNIST from the original idx files: local copies first, else torchvision's download.

Offline cluster nodes often have Debian's `dataset-fashion-mnist`, which installs the gzipped
idx files under /usr/share/datasets/fashion-mnist/.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from kd.data.base import DatasetInfo, ImageData, channel_stats, fetch_or_explain, malformed, register_dataset

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801
SIZE = 28


def search_dirs(root: Path) -> list[Path]:
    """Ours, torchvision's download layout, the user's, Debian's: the first complete one wins."""
    env = os.environ.get("KD_FASHION_MNIST_DIR")
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", *([Path(env)] if env else []), SYSTEM_DIR]


def find_files(root: Path) -> dict[str, Path] | None:
    for folder in search_dirs(root):
        found = {
            key: next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None)
            for key, n in FILES.items()
        }
        if all(found.values()):
            return found
    return None


def read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An idx file (plain or gzipped): big-endian magic, one uint32 per dimension, then uint8 data."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise malformed(path, f"{type(e).__name__}: {e}") from None
    header = 4 * (1 + dims)
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        raise malformed(path, f"not an idx file with magic 0x{magic:08x}")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise malformed(path, f"{len(raw) - header} data bytes for dimensions {shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path, IMAGE_MAGIC, 3)
    labels = read_idx(labels_path, LABEL_MAGIC, 1).astype(np.int64)
    if images.shape[1:] != (SIZE, SIZE):
        raise malformed(images_path, f"{images.shape[1]}x{images.shape[2]} images, expected {SIZE}x{SIZE}")
    if len(labels) != len(images) or labels.max(initial=0) > 9:
        raise malformed(
            labels_path, f"{len(labels)} labels for {len(images)} images, expected one in 0..9 each"
        )
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels)


def load_fashion_mnist(root: Path) -> ImageData:
    from torchvision.datasets import FashionMNIST

    files = find_files(root)
    if files is None:
        raw = root / "FashionMNIST" / "raw"
        fetch_or_explain(
            [raw / name for name in FILES.values()],
            lambda: FashionMNIST(str(root), download=True),
            FashionMNIST.mirrors[0],
            f", or install Debian's dataset-fashion-mnist ({SYSTEM_DIR}), or set KD_FASHION_MNIST_DIR to a folder with them",
        )
        files = {key: raw / name for key, name in FILES.items()}
    x_tr, y_tr = read_split(files["train_images"], files["train_labels"])
    x_te, y_te = read_split(files["test_images"], files["test_labels"])
    mean, std = channel_stats(x_tr)
    return ImageData(x_tr, y_tr, x_te, y_te, 10, mean, std)


register_dataset(
    DatasetInfo(
        name="fashion_mnist",
        load=load_fashion_mnist,
        num_classes=10,
        channels=1,
        image_size=SIZE,
        crop_padding=4,
        flip=True,
        description="Fashion-MNIST, 28x28 grayscale, 60000 train / 10000 test, 10 classes",
        train_images=60000,
    )
)
