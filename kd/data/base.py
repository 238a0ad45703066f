"""The one shape every dataset module returns: uint8 images and int64 labels, as tensors."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from kd.spec import SpecError


class DataError(SpecError):
    """Data missing or malformed: one line saying which files are expected where."""


@dataclass
class ImageData:
    train_images: Tensor  # uint8, (N, C, H, W)
    train_labels: Tensor  # int64, (N,)
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, ...]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    load: Callable[[Path], ImageData]  # root directory -> data (downloads when online)
    num_classes: int
    channels: int
    image_size: int
    crop_padding: int  # random-crop padding of the training augmentation
    flip: bool  # horizontal flips (off for digit datasets, where they change the class)
    description: str


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    DATASETS[info.name] = info
    return info


def data_root(root: str | os.PathLike | None = None) -> Path:
    """`--data-root`, else `KD_DATA_ROOT`, else ./data."""
    return Path(root or os.environ.get("KD_DATA_ROOT") or "data").expanduser()


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())
