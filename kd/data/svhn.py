"""SVHN cropped digits from torchvision's .mat files (root/svhn/{train,test}_32x32.mat)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kd.data.base import DatasetInfo, ImageData, channel_stats, fetch_or_explain, malformed, register_dataset

SPLITS = ("train", "test")


def read_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """X is H x W x C x N uint8 and y is N x 1 with 10 for the digit 0 -> NCHW images, labels 0..9."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path)
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    except (MatReadError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise malformed(path, f"{type(e).__name__}: {e}") from None
    if (
        x.dtype != np.uint8
        or x.ndim != 4
        or x.shape[2] != 3
        or x.shape[3] != len(y)
        or not ((y >= 1) & (y <= 10)).all()
    ):
        raise malformed(path, "expected X uint8 H x W x 3 x N and y N x 1 with labels 1..10")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(y % 10)


def load_svhn(root: Path) -> ImageData:
    from torchvision.datasets import SVHN

    folder = root / "svhn"
    fetch_or_explain(
        [folder / f"{split}_32x32.mat" for split in SPLITS],
        lambda: [SVHN(str(folder), split=split, download=True) for split in SPLITS],
        SVHN.split_list["train"][0].replace("train_", "{train,test}_"),
    )
    (x_tr, y_tr), (x_te, y_te) = (read_mat(folder / f"{split}_32x32.mat") for split in SPLITS)
    mean, std = channel_stats(x_tr)
    return ImageData(x_tr, y_tr, x_te, y_te, 10, mean, std)


register_dataset(
    DatasetInfo(
        name="svhn",
        load=load_svhn,
        num_classes=10,
        channels=3,
        image_size=32,
        crop_padding=4,
        flip=False,
        description="SVHN cropped digits, 32x32 RGB, 73257 train / 10000 test (extra unused), 10 classes",
        train_images=73257,
    )
)
