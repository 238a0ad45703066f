"""Batches from tensors resident on the training device (CPU or GPU), deterministic per epoch.

Each epoch's order and augmentation are drawn from a generator seeded by (seed, epoch), so an
epoch's batches depend on nothing else: a resumed run (even mid-epoch) and a packed run see
exactly the batches an uninterrupted solo run sees. What a method asks beyond images and labels
(`Method.inputs`: each sample's index, a strongly augmented second view) comes with each batch,
drawn from the same generator after the batch's own draws, so asking changes no batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kd.data.augment import crop_flip, draw_crop_flip, draw_strong, normalize, strong_view
from kd.data.base import DATASETS, ImageData, check_validation_split
from kd.methods.base import INDEX, STRONG_VIEW

Extras = dict[str, Tensor]  # a batch's extra inputs by name (INDEX, STRONG_VIEW)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def split_validation(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Stratified (train, validation) indices of the training set, fixed by the seed."""
    if fraction <= 0:
        return torch.arange(len(labels)), torch.arange(0)
    check_validation_split(labels, fraction)
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(
        np.arange(len(labels)), test_size=fraction, stratify=labels.numpy(), random_state=seed
    )
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(val))


@dataclass
class Split:
    images: Tensor  # uint8 on the device
    labels: Tensor  # int64 on the device

    def __len__(self) -> int:
        return len(self.labels)


class DeviceData:
    """A dataset moved to the device once: training batches with augmentation, eval batches without."""

    def __init__(
        self, data: ImageData, dataset: str, device: torch.device, seed: int,
        val_fraction: float = 0.0, train_limit: int = 0,
    ) -> None:
        info = DATASETS[dataset]
        self.padding, self.flip, self.seed = info.crop_padding, info.flip, seed
        self.num_classes, self.in_channels, self.image_size = data.num_classes, info.channels, info.image_size
        train_idx, val_idx = split_validation(data.train_labels, val_fraction, seed)
        if train_limit:
            train_idx = train_idx[:train_limit]
        self.train = Split(data.train_images[train_idx].to(device), data.train_labels[train_idx].to(device))
        self.val = Split(data.train_images[val_idx].to(device), data.train_labels[val_idx].to(device))
        self.test = Split(data.test_images.to(device), data.test_labels.to(device))
        self.train_indices, self.val_indices = train_idx, val_idx
        self.mean = torch.tensor(data.mean, device=device)
        self.std = torch.tensor(data.std, device=device)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.train) // batch_size)

    def train_batches(self, epoch: int, batch_size: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The epoch's augmented batches, from batch number `start` (for a mid-epoch resume)."""
        for images, labels, _ in self.train_batches_with(epoch, batch_size, start):
            yield images, labels

    def train_batches_with(self, epoch: int, batch_size: int, start: int = 0,
                           wants: frozenset[str] = frozenset()) -> Iterator[tuple[Tensor, Tensor, Extras]]:
        """`train_batches` with the extra inputs named in `wants`: INDEX, each sample's position in
        the training split; STRONG_VIEW, its normalised strong view (kd/data/augment.py)."""
        g = epoch_generator(self.seed, epoch)
        n = len(self.train)
        order = torch.randperm(n, generator=g)
        offsets, flips = draw_crop_flip(n, self.padding, self.flip, g)
        strong = draw_strong(n, self.padding, self.flip, self.image_size, g) if STRONG_VIEW in wants else None
        device = self.train.images.device
        for b in range(start, self.steps_per_epoch(batch_size)):
            idx = order[b * batch_size : (b + 1) * batch_size]
            idx_dev = idx.to(device, non_blocking=True)
            raw = self.train.images[idx_dev]
            extras: Extras = {INDEX: idx_dev} if INDEX in wants else {}
            if strong is not None:
                extras[STRONG_VIEW] = normalize(strong_view(raw, strong.select(idx), self.padding), self.mean, self.std)
            images = crop_flip(raw, offsets[idx], flips[idx], self.padding)
            yield normalize(images, self.mean, self.std), self.train.labels[idx_dev], extras

    def eval_batches(self, split: Split, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for b in range(0, len(split), batch_size):
            yield normalize(split.images[b : b + batch_size], self.mean, self.std), split.labels[b : b + batch_size]
