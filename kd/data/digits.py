"""scikit-learn's bundled digits (8x8, 10 classes, 1797 images): offline, for demos and tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kd.data.base import DatasetInfo, ImageData, channel_stats, register_dataset

TEST_FRACTION = 0.2


def load_digits(root: Path) -> ImageData:
    """A fixed stratified 80/20 split; pixel values 0..16 are scaled to 0..255."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=0
    )
    train = torch.from_numpy(x_tr)
    mean, std = channel_stats(train)
    return ImageData(train, torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te), 10, mean, std)


register_dataset(
    DatasetInfo(
        name="digits",
        load=load_digits,
        num_classes=10,
        channels=1,
        image_size=8,
        crop_padding=1,
        flip=False,
        description="scikit-learn digits, 8x8 grayscale, 1437 train / 360 test, offline",
    )
)
