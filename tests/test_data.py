"""Each dataset module reads files written here in the dataset's real on-disk format."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import socket
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

import kd.data.fashion_mnist as fashion_mnist
import kd.data.tinyimagenet as tinyimagenet
from kd.data import DATASETS, DataError, ImageData, load_dataset
from kd.spec import SpecError

rng = np.random.default_rng(0)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may download: every connection attempt fails at once, as on an offline node."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def assert_one_line_error(error: pytest.ExceptionInfo[DataError], *names: object) -> None:
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message


def assert_stats(data: ImageData, images: np.ndarray) -> None:
    """mean/std per channel of the training images scaled to [0, 1] (unbiased std, like torch)."""
    x = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1) / 255
    assert data.mean == pytest.approx(x.mean(1), abs=1e-5)
    assert data.std == pytest.approx(x.std(1, ddof=1), abs=1e-5)


def assert_data(
    data: ImageData, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> None:
    for images, labels, (want_images, want_labels) in [
        (data.train_images, data.train_labels, train),
        (data.test_images, data.test_labels, test),
    ]:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.is_contiguous()
        np.testing.assert_array_equal(images.numpy(), want_images)
        np.testing.assert_array_equal(labels.numpy(), want_labels)
    assert_stats(data, train[0])


@pytest.mark.parametrize(
    "name, channels, size, padding, flip, classes",
    [
        ("cifar10", 3, 32, 4, True, 10),
        ("cifar100", 3, 32, 4, True, 100),
        ("svhn", 3, 32, 4, False, 10),
        ("tinyimagenet", 3, 64, 4, True, 200),
        ("fashion_mnist", 1, 28, 4, True, 10),
    ],
)
def test_registry(name: str, channels: int, size: int, padding: int, flip: bool, classes: int) -> None:
    info = DATASETS[name]
    assert (info.channels, info.image_size, info.crop_padding, info.flip, info.num_classes) == (
        channels,
        size,
        padding,
        flip,
        classes,
    )


# ---------------------------------------------------------------- CIFAR: python pickles with bytes keys

CIFAR = {  # name -> folder, train files, test files, label key, classes
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def write_cifar(root: Path, name: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Batches as the originals: {b'data': N x 3072 uint8 (R plane, G plane, B plane), b'labels': [...]}."""
    folder, train_files, test_files, label_key, classes = CIFAR[name]
    (root / folder).mkdir(parents=True)
    splits = []
    for files in (train_files, test_files):
        rows, labels = [], []
        for file in files:
            data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
            y = rng.integers(0, classes, 3).tolist()
            batch = {b"batch_label": file.encode(), label_key: y, b"data": data, b"filenames": [b"x.png"] * 3}
            if name == "cifar100":
                batch[b"coarse_labels"] = [v // 5 for v in y]
            with (root / folder / file).open("wb") as f:
                pickle.dump(batch, f, protocol=2)
            rows.append(data)
            labels += y
        splits.append((np.concatenate(rows).reshape(-1, 3, 32, 32), np.array(labels)))
    meta = "batches.meta" if name == "cifar10" else "meta"
    with (root / folder / meta).open("wb") as f:
        pickle.dump({b"label_names": [b"c"] * classes}, f, protocol=2)
    return splits[0], splits[1]


@pytest.mark.parametrize("name", list(CIFAR))
def test_cifar_round_trip(tmp_path: Path, offline: None, name: str) -> None:
    train, test = write_cifar(tmp_path, name)
    data = load_dataset(name, tmp_path)
    assert data.num_classes == CIFAR[name][4]
    assert data.train_images.shape == (3 * len(CIFAR[name][1]), 3, 32, 32)
    assert_data(data, train, test)
    # a row is channel-major: its pixel c*1024 + h*32 + w lands at [c, h, w]
    first = CIFAR[name][0] + "/" + CIFAR[name][1][0]
    with (tmp_path / first).open("rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][0]
    assert data.train_images[0, 2, 5, 7] == row[2 * 1024 + 5 * 32 + 7]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: p.write_bytes(p.read_bytes()[:100]),  # truncated download
        lambda p: p.write_bytes(b"<html>not found</html>"),  # not a pickle
        lambda p: p.write_bytes(pickle.dumps({b"labels": [0, 1, 2]})),  # no b'data'
        lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((3, 3000), np.uint8), b"labels": [0, 1, 2]})),
        lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]})),
        lambda p: p.write_bytes(
            pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 10]})
        ),
        lambda p: p.write_bytes(pickle.dumps([1, 2, 3])),
    ],
    ids=[
        "truncated",
        "garbage",
        "no-data",
        "wrong-shape",
        "too-few-labels",
        "label-out-of-range",
        "not-a-dict",
    ],
)
def test_cifar_malformed_file_names_it(tmp_path: Path, offline: None, corrupt) -> None:
    write_cifar(tmp_path, "cifar10")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    corrupt(bad)
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", tmp_path)
    assert_one_line_error(error, bad, "delete it")


def test_cifar_batch_holding_empty_bytes_loads(tmp_path: Path, offline: None) -> None:
    """Protocol 2 writes b'' as a call of bytes(): harmless data the safe unpickler must read."""
    train, test = write_cifar(tmp_path, "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    content = pickle.loads(batch.read_bytes(), encoding="bytes")
    batch.write_bytes(pickle.dumps({**content, b"batch_label": b""}, protocol=2))
    assert_data(load_dataset("cifar10", tmp_path), train, test)


class Hostile:
    """Unpickled by plain pickle, this calls `call(*args)`: what a tampered batch could run."""

    def __init__(self, call: object, *args: object) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple:
        return (self.call, self.args)


@pytest.mark.parametrize("payload", ["open", "system"])
def test_cifar_hostile_pickle_is_refused_before_it_runs(tmp_path: Path, offline: None, payload: str) -> None:
    """A batch whose unpickling would create a file: refused by name, the file never created."""
    write_cifar(tmp_path, "cifar10")
    planted = tmp_path / "planted"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    call = Hostile(open, str(planted), "w") if payload == "open" else Hostile(os.system, f"touch {planted}")
    bad.write_bytes(pickle.dumps({b"data": call, b"labels": [0, 1, 2]}, protocol=2))
    with pytest.raises(SpecError) as error:
        load_dataset("cifar10", tmp_path)
    assert not planted.exists()
    assert_one_line_error(error, bad, "refused", "io.open" if payload == "open" else "system")


@pytest.mark.parametrize("name", list(CIFAR))
def test_cifar_missing_offline_names_expected_files(tmp_path: Path, offline: None, name: str) -> None:
    with pytest.raises(DataError) as error:
        load_dataset(name, tmp_path)
    folder, _, test_files, _, _ = CIFAR[name]
    assert_one_line_error(
        error, tmp_path / folder / test_files[0], "https://www.cs.toronto.edu/~kriz/", "network disabled"
    )


# ---------------------------------------------------------------- SVHN: torchvision's .mat files


def write_svhn(root: Path, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """X is H x W x C x N, y is N x 1 with 10 for the digit 0."""
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.arange(n, dtype=np.uint8).reshape(n, 1) % 10 + 1
    (root / "svhn").mkdir(exist_ok=True)
    savemat(root / "svhn" / f"{split}_32x32.mat", {"X": x, "y": y})
    return x.transpose(3, 2, 0, 1), y.ravel() % 10


def test_svhn_round_trip_through_scipy(tmp_path: Path, offline: None) -> None:
    train, test = write_svhn(tmp_path, "train", 12), write_svhn(tmp_path, "test", 5)
    data = load_dataset("svhn", tmp_path)
    assert data.train_images.shape == (12, 3, 32, 32) and data.num_classes == 10
    assert_data(data, train, test)
    assert data.train_labels[9] == 0 and data.train_labels[0] == 1  # y == 10 is the digit 0


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: p.write_bytes(p.read_bytes()[:300]),
        lambda p: p.write_bytes(b"garbage" * 50),
        lambda p: savemat(p, {"X": np.zeros((32, 32, 3, 2), np.uint8)}),
        lambda p: savemat(p, {"X": np.zeros((32, 32, 2), np.uint8), "y": np.ones((2, 1), np.uint8)}),
        lambda p: savemat(p, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.zeros((2, 1), np.uint8)}),
    ],
    ids=["truncated", "garbage", "no-y", "wrong-dims", "label-0"],
)
def test_svhn_malformed_file_names_it(tmp_path: Path, offline: None, corrupt) -> None:
    write_svhn(tmp_path, "train", 4)
    write_svhn(tmp_path, "test", 2)
    bad = tmp_path / "svhn" / "train_32x32.mat"
    corrupt(bad)
    with pytest.raises(DataError) as error:
        load_dataset("svhn", tmp_path)
    assert_one_line_error(error, bad, "delete it")


def test_svhn_missing_offline_names_expected_files(tmp_path: Path, offline: None) -> None:
    with pytest.raises(DataError) as error:
        load_dataset("svhn", tmp_path)
    assert_one_line_error(
        error, tmp_path / "svhn" / "train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/"
    )


# ---------------------------------------------------------------- Tiny ImageNet: JPEG folders + val annotations

WNIDS = [f"n{i:08d}" for i in range(200)]


def decoded(path: Path) -> np.ndarray:
    """What the JPEG decodes to, as RGB CHW: the exact values the loader must return."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def jpeg(path: Path, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, "JPEG")
    return path


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple, tuple]:
    """The unzipped layout: one train image per class (two, one grayscale, for the first), 5 val images."""
    tree = tmp_path_factory.mktemp("tiny") / "tiny-imagenet-200"
    tree.mkdir()
    (tree / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    train_images, train_labels = [], []
    for label, wnid in enumerate(WNIDS):
        (tree / "train" / wnid).mkdir(parents=True)
        (tree / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
        modes = ["RGB", "L"] if label == 0 else ["RGB"]
        for k, mode in enumerate(modes):
            train_images.append(decoded(jpeg(tree / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", mode)))
            train_labels.append(label)
    lines, test_images, test_labels = [], [], []
    for k, label in enumerate([3, 199, 0, 3, 42]):
        test_images.append(decoded(jpeg(tree / "val" / "images" / f"val_{k}.JPEG")))
        test_labels.append(label)
        lines.append(f"val_{k}.JPEG\t{WNIDS[label]}\t0\t5\t60\t62\n")
    (tree / "val" / "val_annotations.txt").write_text("".join(lines))
    return (
        tree,
        (np.stack(train_images), np.array(train_labels)),
        (np.stack(test_images), np.array(test_labels)),
    )


@pytest.fixture
def tiny_root(tmp_path: Path, tiny_tree: tuple[Path, tuple, tuple]) -> Path:
    """A fresh copy per test, free to corrupt."""
    shutil.copytree(tiny_tree[0], tmp_path / "tiny-imagenet-200")
    return tmp_path


def test_tinyimagenet_round_trip_and_cache(
    tiny_root: Path, tiny_tree: tuple[Path, tuple, tuple], offline: None
) -> None:
    _, train, test = tiny_tree
    data = load_dataset("tinyimagenet", tiny_root)
    assert data.train_images.shape == (201, 3, 64, 64) and data.num_classes == 200
    assert_data(data, train, test)
    gray = data.train_images[1]  # the grayscale JPEG, now RGB
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])

    cache = tiny_root / "tinyimagenet_uint8.npz"
    assert cache.is_file() and not list(tiny_root.glob("*.tmp"))
    shutil.rmtree(tiny_root / "tiny-imagenet-200")  # the second load can only come from the cache
    again = load_dataset("tinyimagenet", tiny_root)
    for field in ("train_images", "train_labels", "test_images", "test_labels", "mean", "std"):
        value, cached = getattr(data, field), getattr(again, field)
        assert torch.equal(value, cached) if isinstance(value, torch.Tensor) else value == cached


@pytest.mark.parametrize(
    "relative, corrupt, named",
    [
        ("val/val_annotations.txt", lambda p: p.write_text("val_0.JPEG\tn00000003\n"), "line 1"),
        ("val/val_annotations.txt", lambda p: p.write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n"), "line 1"),
        ("val/images/val_2.JPEG", lambda p: p.unlink(), "val_annotations.txt line 3"),
        (
            "train/n00000007/images/n00000007_0.JPEG",
            lambda p: p.write_bytes(p.read_bytes()[:200]),
            "delete it",
        ),
        (
            "train/n00000007/images/n00000007_0.JPEG",
            lambda p: Image.new("RGB", (32, 32)).save(p, "JPEG"),
            "32x32",
        ),
        ("wnids.txt", lambda p: p.write_text("n00000001\n"), "expected 200"),
    ],
    ids=["short-line", "unknown-wnid", "missing-image", "truncated-jpeg", "wrong-size", "few-wnids"],
)
def test_tinyimagenet_malformed_names_the_file(
    tiny_root: Path, offline: None, relative: str, corrupt, named: str
) -> None:
    bad = tiny_root / "tiny-imagenet-200" / relative
    corrupt(bad)
    with pytest.raises(DataError) as error:
        load_dataset("tinyimagenet", tiny_root)
    assert_one_line_error(error, bad, named)
    assert not (tiny_root / "tinyimagenet_uint8.npz").exists()


def test_tinyimagenet_truncated_cache_names_it(tiny_root: Path, offline: None) -> None:
    load_dataset("tinyimagenet", tiny_root)
    cache = tiny_root / "tinyimagenet_uint8.npz"
    cache.write_bytes(cache.read_bytes()[:1000])
    with pytest.raises(DataError) as error:
        load_dataset("tinyimagenet", tiny_root)
    assert_one_line_error(error, cache, "delete it")


def cache_arrays(train_labels: np.ndarray, test_labels: np.ndarray) -> dict[str, np.ndarray]:
    """A cache's four arrays around the given labels (black images)."""
    return {"train_images": np.zeros((len(train_labels), 3, 64, 64), np.uint8), "train_labels": train_labels,
            "test_images": np.zeros((len(test_labels), 3, 64, 64), np.uint8), "test_labels": test_labels}


@pytest.mark.parametrize(
    "train_labels, test_labels",
    [
        (np.array([0, 200]), np.array([3])),  # out of range
        (np.array([0, 1]), np.array([-1])),
        (np.array([0.0, 1.0]), np.array([3])),  # not int64
        (np.array([], np.int64), np.array([3])),  # an empty split
    ],
    ids=["label-200", "label-minus-1", "float-labels", "empty-train"],
)
def test_tinyimagenet_cache_with_wrong_labels_names_it(
    tmp_path: Path, offline: None, train_labels: np.ndarray, test_labels: np.ndarray
) -> None:
    cache = tmp_path / tinyimagenet.CACHE
    tinyimagenet.write_cache(cache, cache_arrays(train_labels, test_labels))
    with pytest.raises(DataError) as error:
        load_dataset("tinyimagenet", tmp_path)
    assert_one_line_error(error, cache, "labels must be int64 in 0..199, at least one", "delete it")


@pytest.mark.parametrize("root_mode, cache_mode", [(0o750, 0o640), (0o700, 0o600), (0o775, 0o664)])
def test_tinyimagenet_cache_is_readable_like_the_data_root(tmp_path: Path, root_mode: int, cache_mode: int) -> None:
    root = tmp_path / "data"
    root.mkdir(mode=root_mode)
    root.chmod(root_mode)  # mkdir's mode passes through the umask
    tinyimagenet.write_cache(root / tinyimagenet.CACHE, cache_arrays(np.array([0]), np.array([1])))
    assert stat.S_IMODE((root / tinyimagenet.CACHE).stat().st_mode) == cache_mode


def test_tinyimagenet_wnids_not_utf8_names_it(tiny_root: Path, offline: None) -> None:
    wnids = tiny_root / "tiny-imagenet-200" / "wnids.txt"
    wnids.write_bytes(wnids.read_bytes().replace(b"n00000007", b"n0000\xe9007"))
    with pytest.raises(DataError) as error:
        load_dataset("tinyimagenet", tiny_root)
    assert_one_line_error(error, wnids, "not UTF-8 text: byte 75", "delete it")


def test_tinyimagenet_missing_offline_names_expected_files(tmp_path: Path, offline: None) -> None:
    with pytest.raises(DataError) as error:
        load_dataset("tinyimagenet", tmp_path)
    assert_one_line_error(error, tmp_path / "tiny-imagenet-200" / "wnids.txt", "tiny-imagenet-200.zip")


# ---------------------------------------------------------------- Fashion-MNIST: idx files, gzipped or plain

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x803 if array.ndim == 3 else 0x801
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def write_fashion(folder: Path, gz: bool, n_train: int = 7, n_test: int = 3) -> tuple[tuple, tuple]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    ]
    for name, array in zip(IDX_NAMES, arrays, strict=True):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / name).write_bytes(idx_bytes(array))
    return (arrays[0][:, None], arrays[1]), (arrays[2][:, None], arrays[3])


@pytest.fixture
def no_system_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide Debian's copy and the user's variable so that only the test's files are found."""
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.delenv("KD_FASHION_MNIST_DIR", raising=False)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
@pytest.mark.parametrize("where", ["fashion-mnist", "FashionMNIST/raw", "$KD_FASHION_MNIST_DIR", "system"])
def test_fashion_mnist_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_system_copy: None, offline: None, gz: bool, where: str
) -> None:
    root = tmp_path / "root"
    if where == "$KD_FASHION_MNIST_DIR":
        folder = tmp_path / "elsewhere"
        monkeypatch.setenv("KD_FASHION_MNIST_DIR", str(folder))
    elif where == "system":
        folder = fashion_mnist.SYSTEM_DIR
    else:
        folder = root / where
    train, test = write_fashion(folder, gz)
    data = load_dataset("fashion_mnist", root)
    assert data.train_images.shape == (7, 1, 28, 28) and data.num_classes == 10
    assert_data(data, train, test)


def test_fashion_mnist_first_complete_folder_wins(
    tmp_path: Path, no_system_copy: None, offline: None
) -> None:
    write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False, n_train=5)
    write_fashion(tmp_path / "fashion-mnist", gz=True, n_train=4)
    assert len(load_dataset("fashion_mnist", tmp_path).train_images) == 4
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()  # incomplete: skipped
    assert len(load_dataset("fashion_mnist", tmp_path).train_images) == 5


@pytest.mark.parametrize(
    "name, corrupt, named",
    [
        ("train-images-idx3-ubyte.gz", lambda b: gzip.compress(b"\x00\x00\x08\x01" + b[4:]), "magic"),
        ("train-images-idx3-ubyte.gz", lambda b: gzip.compress(b[:-10]), "data bytes"),
        ("train-images-idx3-ubyte.gz", lambda b: gzip.compress(b)[:500], "EOFError"),
        ("train-images-idx3-ubyte.gz", lambda b: b"not gzip at all", "BadGzipFile"),
        (
            "t10k-labels-idx1-ubyte.gz",
            lambda b: gzip.compress(idx_bytes(np.zeros(2, np.uint8))),
            "2 labels for 3",
        ),
        ("t10k-labels-idx1-ubyte.gz", lambda b: gzip.compress(idx_bytes(np.full(3, 10, np.uint8))), "0..9"),
        (
            "t10k-images-idx3-ubyte.gz",
            lambda b: gzip.compress(idx_bytes(np.zeros((3, 28, 27), np.uint8))),
            "28x27",
        ),
    ],
    ids=["magic", "short", "truncated-gzip", "not-gzip", "label-count", "label-range", "dims"],
)
def test_fashion_mnist_malformed_names_the_file(
    tmp_path: Path, no_system_copy: None, offline: None, name: str, corrupt, named: str
) -> None:
    write_fashion(tmp_path / "fashion-mnist", gz=True)
    bad = tmp_path / "fashion-mnist" / name
    bad.write_bytes(corrupt(gzip.decompress(bad.read_bytes())))
    with pytest.raises(DataError) as error:
        load_dataset("fashion_mnist", tmp_path)
    assert_one_line_error(error, bad, named)


def test_fashion_mnist_missing_offline_names_expected_files(
    tmp_path: Path, no_system_copy: None, offline: None
) -> None:
    with pytest.raises(DataError) as error:
        load_dataset("fashion_mnist", tmp_path)
    expected = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    assert_one_line_error(
        error, expected, "dataset-fashion-mnist", "KD_FASHION_MNIST_DIR", "network disabled"
    )


REAL_FASHION = fashion_mnist.SYSTEM_DIR


@pytest.mark.skipif(
    not all((REAL_FASHION / f"{name}.gz").is_file() for name in IDX_NAMES),
    reason=f"the real Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist -> {REAL_FASHION})",
)
def test_fashion_mnist_real_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None) -> None:
    monkeypatch.delenv("KD_FASHION_MNIST_DIR", raising=False)
    data = load_dataset("fashion_mnist", tmp_path)
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.train_labels.bincount().tolist() == [6000] * 10
    assert data.test_labels.bincount().tolist() == [1000] * 10
    assert data.mean[0] == pytest.approx(0.2860, abs=1e-3) and data.std[0] == pytest.approx(0.3530, abs=1e-3)
