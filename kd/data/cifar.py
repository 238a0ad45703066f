"""CIFAR-10 and CIFAR-100 from the original python-pickle batches (torchvision downloads them)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kd import safe_pickle
from kd.data.base import DatasetInfo, ImageData, channel_stats, fetch_or_explain, malformed, register_dataset


@dataclass(frozen=True)
class Layout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    torchvision_class: str  # the class whose download=True fetches and unpacks the archive
    description: str


LAYOUTS = {
    "cifar10": Layout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        "CIFAR10",
        "CIFAR-10, 32x32 RGB, 50000 train / 10000 test, 10 classes",
    ),
    "cifar100": Layout(
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
        100,
        "CIFAR100",
        "CIFAR-100, 32x32 RGB, 50000 train / 10000 test, 100 fine classes",
    ),
}
PARSE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError)


def read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (N, 3, 32, 32) uint8 images (rows are CHW) and int64 labels; a batch that
    asks the unpickler for anything but data is refused before it can run (safe_pickle)."""
    try:
        batch = safe_pickle.load(path, encoding="bytes")  # Python 2 str -> bytes, as the keys are
        images = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except safe_pickle.UnsafePickle:
        raise  # already one line naming the file and what it asked for
    except PARSE_ERRORS as e:
        raise malformed(path, f"{type(e).__name__}: {e}") from None
    if (
        images.dtype != np.uint8
        or images.shape != (len(labels), 3 * 32 * 32)
        or labels.ndim != 1
        or not ((labels >= 0) & (labels < num_classes)).all()
    ):
        raise malformed(
            path, f"expected b'data' uint8 N x 3072 and {label_key!r} N labels in 0..{num_classes - 1}"
        )
    return images.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, root: Path) -> ImageData:
    import torchvision.datasets

    layout = LAYOUTS[name]
    folder = root / layout.folder
    tv = getattr(torchvision.datasets, layout.torchvision_class)
    fetch_or_explain(
        [folder / f for f in layout.train_files + layout.test_files],
        lambda: tv(str(root), download=True),
        tv.url,
    )

    def read(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read_batch(folder / f, layout.label_key, layout.num_classes) for f in files]
        return (
            torch.from_numpy(np.concatenate([images for images, _ in parts])),
            torch.from_numpy(np.concatenate([labels for _, labels in parts])),
        )

    x_tr, y_tr = read(layout.train_files)
    x_te, y_te = read(layout.test_files)
    mean, std = channel_stats(x_tr)
    return ImageData(x_tr, y_tr, x_te, y_te, layout.num_classes, mean, std)


for _name, _layout in LAYOUTS.items():
    register_dataset(
        DatasetInfo(
            name=_name,
            load=partial(load_cifar, _name),
            num_classes=_layout.num_classes,
            channels=3,
            image_size=32,
            crop_padding=4,
            flip=True,
            description=_layout.description,
            train_images=50_000,
        )
    )
