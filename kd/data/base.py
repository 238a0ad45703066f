"""The one shape every dataset module returns: uint8 images and int64 labels, as tensors."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kd.errors import SpecError


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
    train_images: int = 0  # the training split's size, for estimates before any data is loaded (0: unknown)


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    DATASETS[info.name] = info
    return info


def data_root(root: str | os.PathLike | None = None) -> Path:
    """`--data-root`, else `KD_DATA_ROOT`, else ./data."""
    return Path(root or os.environ.get("KD_DATA_ROOT") or "data").expanduser()


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], in chunks (TinyImageNet is 1.2 GB)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].double().div_(255)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = images.numel() // images.shape[1]
    mean = total / n
    std = ((squares - n * mean.square()) / (n - 1)).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def check_validation_split(labels: Tensor, fraction: float) -> None:
    """A stratified split needs an image of every class on both sides (0.999 of digits leaves 1 to train on):
    refused in one line naming the fractions that work, before any run."""
    n, classes = len(labels), int(labels.unique().numel())
    held_out = math.ceil(fraction * n)
    if classes <= held_out <= n - classes:
        return
    low, high = math.ceil(1000 * classes / n) / 1000, math.floor(1000 * (1 - classes / n)) / 1000
    raise SpecError(f"val_fraction {fraction:g} holds out {held_out} of {n} training images and leaves {n - held_out}: "
                    f"each side needs an image of each of the {classes} classes: pass --val-fraction from {low:g} "
                    f"to {high:g}")


DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: an unreachable host fails fast instead of hanging


def malformed(path: Path, problem: str, fix: str = "delete it and re-run to download it again") -> DataError:
    """The one message for a damaged file: which file, what is wrong, how to get a good copy."""
    return DataError(f"{path} is malformed ({' '.join(problem.split())}); {fix}")


def fetch_or_explain(
    files: Sequence[Path], download: Callable[[], object], url: str, alternative: str = ""
) -> None:
    """Download when any of `files` is missing; if that fails (offline), say what to put where.

    A download error's traceback helps nobody on a cluster node without internet, so it becomes
    one line naming the expected files and the URL to fetch them from on a machine that has it;
    `alternative` appends other ways to provide the files.
    """
    if all(f.exists() for f in files):
        return
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download()
        error = ""
    except Exception as e:  # any failure to fetch ends in the same advice
        error = " ".join(f"{type(e).__name__}: {e}".split())  # one line, even for multi-line errors
    finally:
        socket.setdefaulttimeout(previous)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(
            f"missing {', '.join(missing)} and the download failed ({error or 'no such files in it'}); "
            f"download {url} on a machine with internet and copy or unpack it so these files exist{alternative}"
        )
