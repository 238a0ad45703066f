"""Datasets by name: one module each, returning uint8 tensors (see base.ImageData)."""

from kd.data import cifar, digits, fashion_mnist, svhn, tinyimagenet  # noqa: F401  (registration)
from kd.data.base import DATASETS, DataError, DatasetInfo, ImageData, data_root, register_dataset

__all__ = ["DATASETS", "DataError", "DatasetInfo", "ImageData", "data_root", "load_dataset", "register_dataset"]


def load_dataset(name: str, root=None) -> ImageData:
    return DATASETS[name].load(data_root(root))
