"""Tiny ImageNet (200 classes, 64x64 RGB); its labelled val split is the test set.

Decoding 110k JPEGs takes minutes, so the first load caches uint8 arrays next to the tree.
"""

from __future__ import annotations

import os
import stat
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from kd.data.base import (
    DataError,
    DatasetInfo,
    ImageData,
    channel_stats,
    fetch_or_explain,
    malformed,
    register_dataset,
)

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TREE = "tiny-imagenet-200"
CACHE = "tinyimagenet_uint8.npz"
NUM_CLASSES = 200
SIZE = 64
REBUILD = "delete it and re-run to rebuild it from the tree"
KEYS = ("train_images", "train_labels", "test_images", "test_labels")
Arrays = dict[str, np.ndarray]


def read_jpeg(path: Path) -> np.ndarray:
    """3 x 64 x 64 uint8; the few grayscale images become RGB."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            x = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise malformed(path, f"{type(e).__name__}: {e}") from None
    if x.shape != (SIZE, SIZE, 3):
        raise malformed(path, f"{x.shape[1]}x{x.shape[0]} pixels, expected {SIZE}x{SIZE}")
    return x.transpose(2, 0, 1)


def read_images(paths: list[Path]) -> np.ndarray:
    out = np.empty((len(paths), 3, SIZE, SIZE), np.uint8)
    with ThreadPoolExecutor() as pool:  # Pillow decodes without the GIL
        for i, x in enumerate(pool.map(read_jpeg, paths)):
            out[i] = x
    return out


def read_text(path: Path) -> str:
    """A text file of the tree; one that is not UTF-8 is a damaged download."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise malformed(path, f"not UTF-8 text: byte {err.start}") from None


def parse_tree(tree: Path) -> Arrays:
    """wnids.txt orders the classes; train/<wnid>/images/ and val/val_annotations.txt label the images."""
    wnids_file = tree / "wnids.txt"
    wnids = read_text(wnids_file).split()
    if len(set(wnids)) != NUM_CLASSES or len(wnids) != NUM_CLASSES:
        raise malformed(wnids_file, f"{len(wnids)} ids, expected {NUM_CLASSES} distinct wnids")
    index = {wnid: i for i, wnid in enumerate(wnids)}

    train_paths, train_labels = [], []
    for wnid, label in index.items():
        folder = tree / "train" / wnid / "images"
        files = sorted(folder.glob("*.JPEG"))
        if not files:
            raise DataError(f"no *.JPEG in {folder}; delete {tree} and re-run to download it again")
        train_paths += files
        train_labels += [label] * len(files)

    annotations = tree / "val" / "val_annotations.txt"
    test_paths, test_labels = [], []
    for number, line in enumerate(read_text(annotations).splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 6 or fields[1] not in index:
            raise malformed(
                annotations,
                f"line {number}: expected file, wnid from wnids.txt, 4 box numbers, tab-separated",
            )
        path = tree / "val" / "images" / fields[0]
        if not path.is_file():
            raise DataError(
                f"{path}, listed in {annotations} line {number}, is missing; delete {tree} and re-run to download it again"
            )
        test_paths.append(path)
        test_labels.append(index[fields[1]])
    if not test_paths:
        raise malformed(annotations, "no lines")

    return {
        "train_images": read_images(train_paths),
        "train_labels": np.array(train_labels, np.int64),
        "test_images": read_images(test_paths),
        "test_labels": np.array(test_labels, np.int64),
    }


def write_cache(path: Path, arrays: Arrays) -> None:
    """Atomic (temp file + rename): an interrupted write never leaves a half cache to trip on later.
    Readable by whoever may read the data root (mkstemp's file is the owner's alone)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, stat.S_IMODE(path.parent.stat().st_mode) & 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cache(path: Path) -> Arrays:
    """The cached arrays, checked as the tree's parse makes them: a cache from elsewhere or an older
    kd must not feed a run wrong labels (or none)."""
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise malformed(path, f"{type(e).__name__}: {e}", REBUILD) from None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.shape[1:] != (3, SIZE, SIZE) or labels.shape != (len(images),):
            raise malformed(path, f"{split} arrays have the wrong dtype or shape", REBUILD)
        if labels.dtype != np.int64 or not len(labels) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise malformed(path, f"{split} labels must be int64 in 0..{NUM_CLASSES - 1}, at least one", REBUILD)
    return arrays


def load_tinyimagenet(root: Path) -> ImageData:
    cache = root / CACHE
    if cache.exists():
        arrays = read_cache(cache)
    else:
        from torchvision.datasets.utils import download_and_extract_archive

        tree = root / TREE
        fetch_or_explain(
            [tree / "wnids.txt", tree / "train", tree / "val" / "val_annotations.txt"],
            lambda: download_and_extract_archive(URL, str(root), md5=MD5, remove_finished=True),
            URL,
        )
        arrays = parse_tree(tree)
        write_cache(cache, arrays)
    x_tr, y_tr, x_te, y_te = (torch.from_numpy(arrays[key]) for key in KEYS)
    mean, std = channel_stats(x_tr)
    return ImageData(x_tr, y_tr, x_te, y_te, NUM_CLASSES, mean, std)


register_dataset(
    DatasetInfo(
        name="tinyimagenet",
        load=load_tinyimagenet,
        num_classes=NUM_CLASSES,
        channels=3,
        image_size=SIZE,
        crop_padding=4,
        flip=True,
        description="Tiny ImageNet, 64x64 RGB, 100000 train / 10000 val (as test), 200 classes",
        train_images=100000,
    )
)
