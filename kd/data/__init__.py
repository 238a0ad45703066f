"""Datasets by name: one module each, returning uint8 tensors (see base.ImageData)."""

from kd.data import cifar, digits, fashion_mnist, svhn, tinyimagenet  # noqa: F401  (registration)
from kd.data.base import DATASETS, DataError, DatasetInfo, ImageData, data_root, register_dataset

__all__ = ["DATASETS", "DataError", "DatasetInfo", "ImageData", "data_root", "load_dataset", "register_dataset"]


def load_dataset(name: str, root=None) -> ImageData:
    """The dataset's tensors; a data root or file this user may not read is one line, not a traceback."""
    folder = data_root(root)
    try:
        return DATASETS[name].load(folder)
    except OSError as err:
        raise DataError(f"{err.filename or folder} cannot be used ({err.strerror or err}): make the data root "
                        f"{folder} readable by this user (writable for a first download), or pass --data-root "
                        "a readable copy") from None
