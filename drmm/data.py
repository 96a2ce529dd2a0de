"""Data sets (MNIST, Fashion-MNIST, CIFAR-10, SVHN) as whole uint8 tensors, and seeded labeled subsets.

Where the files come from, in order: ``data_dir`` (the ``--data-dir`` flag / config key), the ``DRMM_DATA_DIR``
environment variable, ``./data``. Local files are checked by their headers, counts and sizes, not by md5 (Debian
recompresses Fashion-MNIST, so its archives have other checksums than the upstream ones). Missing files are
downloaded from the standard URLs when ``download`` is on, and the downloaded archive's md5 is verified; a server
that cannot be reached fails within ``DOWNLOAD_TIMEOUT_S`` seconds. When neither works the error (a
``DataNotFoundError``, one line) names the expected files, the folders searched and both ways to provide them; a
truncated or corrupt file is a ``CorruptDataError`` naming the file and how to replace it.

The sets are small enough to live on the training device as one tensor each; batches are index gathers.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import socket
import tarfile
import threading
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .errors import UsageError, did_you_mean

DATASETS = ("mnist", "fashion_mnist", "cifar10", "svhn")

_IDX_FILES = {  # name -> (expected count, is_images)
    "train-images-idx3-ubyte": (60000, True),
    "train-labels-idx1-ubyte": (60000, False),
    "t10k-images-idx3-ubyte": (10000, True),
    "t10k-labels-idx1-ubyte": (10000, False),
}
_DOWNLOADS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
    "svhn": (
        "http://ufldl.stanford.edu/housenumbers/",
        {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373", "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"},
    ),
}
# Per-channel normalisation (in [0, 1] units). MNIST: raw [0, 1] pixels, as the [TF] code and the DGM semi-sup notebook.
_NORMALISATION = {
    "mnist": ((0.0,), (1.0,)),
    "fashion_mnist": ((0.0,), (1.0,)),
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "svhn": ((115.4 / 255, 115.4 / 255, 119.6 / 255), (56.0 / 255, 57.8 / 255, 58.3 / 255)),
}


DOWNLOAD_TIMEOUT_S = 10.0  # name lookup, connect and each read; a blocked network fails fast, not after minutes


class DataNotFoundError(UsageError, FileNotFoundError):
    """The data set's files are not in any folder searched, and downloading them was off or failed."""


class CorruptDataError(UsageError):
    """A data file is there but truncated, corrupt or of another format; the message names it."""


@dataclass
class ImageData:
    """A data set as uint8 image tensors (N, C, H, W) and int64 labels; ``normalize`` maps a batch to floats."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int = 10
    # A validation split held out of the training set (``hold_out_validation``); None when there is none.
    val_images: Optional[Tensor] = None
    val_labels: Optional[Tensor] = None

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def to(self, device) -> "ImageData":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ImageData(
            self.name,
            self.train_images.to(device),
            self.train_labels.to(device),
            self.test_images.to(device),
            self.test_labels.to(device),
            self.num_classes,
            move(self.val_images),
            move(self.val_labels),
        )

    def hold_out_validation(self, num: int) -> None:
        """Move the last ``num`` training images into the validation split (model selection without the test set)."""
        n = len(self.train_labels)
        if not 0 < num < n:
            raise UsageError(
                f"val_samples must be in [1, {n - 1}] for {n} training images, got {num}; "
                f"lower val_samples (or raise max_train_samples)"
            )
        self.val_images, self.val_labels = self.train_images[n - num :], self.train_labels[n - num :]
        self.train_images, self.train_labels = self.train_images[: n - num], self.train_labels[: n - num]

    def normalize(self, images: Tensor) -> Tensor:
        mean, std = _NORMALISATION[self.name]
        x = images.float().div_(255.0)
        if any(m != 0.0 for m in mean) or any(s != 1.0 for s in std):
            x = (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)
        return x


# ---------------------------------------------------------------- locating and downloading


def data_root(data_dir: Optional[str] = None) -> Path:
    return Path(data_dir or os.environ.get("DRMM_DATA_DIR") or "data").expanduser()


def _candidate_dirs(name: str, root: Path) -> List[Path]:
    sub = {
        "mnist": ["mnist", "MNIST/raw"],
        "fashion_mnist": ["fashion-mnist", "fashion_mnist", "FashionMNIST/raw"],
        "cifar10": ["cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar-10/cifar-10-batches-py"],
        "svhn": ["svhn", "SVHN"],
    }[name]
    return [root / s for s in sub] + [root]


def _expected_files(name: str) -> List[str]:
    if name in ("mnist", "fashion_mnist"):
        return [f"{stem}.gz (or uncompressed {stem})" for stem in _IDX_FILES]
    if name == "cifar10":
        return [f"cifar-10-batches-py/{f}" for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]]
    return ["train_32x32.mat", "test_32x32.mat"]


def _missing_error(name: str, root: Path, reason: str) -> DataNotFoundError:
    url, files = _DOWNLOADS[name]
    dirs = ", ".join(str(d) for d in _candidate_dirs(name, root))
    return DataNotFoundError(
        f"{name} data not found in {root} ({reason}): expected {', '.join(_expected_files(name))} in one of "
        f"{dirs}; put the files there and point --data-dir (config key data_dir) or DRMM_DATA_DIR at {root}, "
        f"or let the loader download them (config download: true, needs network) from {url}"
    )


def _redownload_hint(name: str, path: Path) -> str:
    """How to replace a bad file of data set ``name``: where it comes from and its published md5."""
    url, files = _DOWNLOADS[name]
    archive = path.name if path.name in files else (path.name + ".gz" if path.name + ".gz" in files else None)
    if archive is None:  # a file unpacked from an archive (CIFAR-10 batches)
        archive = next(iter(files))
    return (
        f"delete it and download it again ({url}{archive}, published md5 {files[archive]}; with config "
        f"download: true the loader fetches and checks it)"
    )


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_reachable(url: str, timeout: float) -> None:
    """Resolve the URL's host within ``timeout`` s: urlopen's timeout covers connect and reads but not the name
    lookup, which a machine without network can block on for minutes."""
    host = urllib.parse.urlparse(url).hostname
    if not host:  # file:// URLs (tests, mirrors on disk)
        return
    result: List[BaseException] = []

    def lookup():
        try:
            socket.getaddrinfo(host, None)
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"looking up {host} took over {timeout:.0f} s (no network?)")
    if result:
        raise result[0]


def download(name: str, root: Path) -> Path:
    """Download ``name``'s standard files into ``root``'s first candidate folder; verify each archive's md5."""
    from tqdm import tqdm

    url, files = _DOWNLOADS[name]
    target = _candidate_dirs(name, root)[0] if name != "cifar10" else root
    target.mkdir(parents=True, exist_ok=True)
    for fname, md5 in files.items():
        dest = target / fname
        if dest.exists() and _md5(dest) == md5:
            continue
        tmp = dest.with_suffix(dest.suffix + ".part")
        _check_reachable(url + fname, DOWNLOAD_TIMEOUT_S)
        with urllib.request.urlopen(url + fname, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {fname}") as bar:
                for chunk in iter(lambda: resp.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        got = _md5(tmp)
        if got != md5:
            tmp.unlink()
            raise IOError(f"{name}: md5 of downloaded {fname} is {got}, expected {md5}; the file was removed")
        os.replace(tmp, dest)
        if fname.endswith(".tar.gz"):
            with tarfile.open(dest) as tar:
                try:
                    tar.extractall(target, filter="data")  # refuse absolute paths / links out of target
                except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4)
                    tar.extractall(target)
    return target


# ---------------------------------------------------------------- readers (with format checks)


def read_idx(path: Path, expected_count: Optional[int] = None, fix: str = "") -> np.ndarray:
    """An IDX file (``.gz`` or raw) as a uint8 array; checks magic, dimensions and size.

    A truncated or corrupt file raises ``CorruptDataError`` naming it; ``fix`` says how to replace it.
    """
    fix = fix or "delete it and download it again (config download: true fetches and md5-checks it)"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorruptDataError(f"{path}: truncated or corrupt gzip file ({e}); {fix}") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CorruptDataError(
            f"{path}: not an unsigned-byte IDX file (bad magic {data[:4].hex()}, expected 00000801 or 00000803); {fix}"
        )
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) != offset + int(np.prod(dims)):
        raise CorruptDataError(
            f"{path}: size {len(data)} bytes does not match its header dims {dims} (truncated?); {fix}"
        )
    if expected_count is not None and dims[0] != expected_count:
        raise CorruptDataError(f"{path}: holds {dims[0]} items, expected {expected_count}; {fix}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()  # writable, for torch


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for p in (folder / f"{stem}.gz", folder / stem):
        if p.exists():
            return p
    return None


def _load_mnist_like(folder: Path, name: str = "mnist") -> Dict[str, np.ndarray]:
    arrays = {}
    for stem, (count, is_images) in _IDX_FILES.items():
        path = _find_idx(folder, stem)
        arr = read_idx(path, count, _redownload_hint(name, path))
        if is_images and arr.shape[1:] != (28, 28):
            raise CorruptDataError(
                f"{path}: images are {arr.shape[1:]}, expected 28x28; {_redownload_hint(name, path)}"
            )
        arrays[stem] = arr
    return {
        "train_x": arrays["train-images-idx3-ubyte"][:, None],
        "train_y": arrays["train-labels-idx1-ubyte"],
        "test_x": arrays["t10k-images-idx3-ubyte"][:, None],
        "test_y": arrays["t10k-labels-idx1-ubyte"],
    }


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    fix = _redownload_hint("cifar10", path)
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as e:
        raise CorruptDataError(
            f"{path}: truncated or corrupt CIFAR-10 batch ({e.__class__.__name__}: {e}); {fix}"
        ) from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise CorruptDataError(
            f"{path}: not a CIFAR-10 python batch (a pickled dict with b'data' and b'labels'); {fix}"
        )
    x, y = np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"labels"], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise CorruptDataError(
            f"{path}: data has shape {x.shape} and {len(y)} labels; expected (N, 3072) and N labels; {fix}"
        )
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise CorruptDataError(f"{path}: labels outside 0..9; {fix}")
    return x.reshape(-1, 3, 32, 32), y


def _load_cifar10(folder: Path) -> Dict[str, np.ndarray]:
    parts = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_cifar_batch(folder / "test_batch")
    return {
        "train_x": np.concatenate([p[0] for p in parts]),
        "train_y": np.concatenate([p[1] for p in parts]),
        "test_x": test_x,
        "test_y": test_y,
    }


def _read_svhn(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    fix = _redownload_hint("svhn", path)
    try:
        d = loadmat(path)
    except (ValueError, TypeError, OSError, EOFError) as e:  # scipy's MatReadError is a ValueError
        raise CorruptDataError(f"{path}: truncated or corrupt .mat file ({e}); {fix}") from None
    if "X" not in d or "y" not in d:
        raise CorruptDataError(f"{path}: not an SVHN cropped-digits .mat file (needs variables X and y); {fix}")
    x, y = np.asarray(d["X"], dtype=np.uint8), np.asarray(d["y"], dtype=np.int64).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise CorruptDataError(
            f"{path}: X has shape {x.shape} and y {len(y)} entries; expected (32, 32, 3, N) and N; {fix}"
        )
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise CorruptDataError(f"{path}: labels outside 1..10; {fix}")
    y = np.where(y == 10, 0, y)  # SVHN stores digit 0 as label 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


def _load_svhn(folder: Path) -> Dict[str, np.ndarray]:
    train_x, train_y = _read_svhn(folder / "train_32x32.mat")
    test_x, test_y = _read_svhn(folder / "test_32x32.mat")
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _present(name: str, folder: Path) -> bool:
    if name in ("mnist", "fashion_mnist"):
        return all(_find_idx(folder, stem) is not None for stem in _IDX_FILES)
    if name == "cifar10":
        return all((folder / f).exists() for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    return all((folder / f).exists() for f in ("train_32x32.mat", "test_32x32.mat"))


_LOADERS = {"mnist": _load_mnist_like, "fashion_mnist": _load_mnist_like, "cifar10": _load_cifar10, "svhn": _load_svhn}


_CACHE: Dict[Tuple[str, str], ImageData] = {}  # decoded sets by (name, folder): tests and CLI reload cheaply


def load_dataset(name: str, data_dir: Optional[str] = None, download_missing: bool = False) -> ImageData:
    """Load data set ``name`` (one of DATASETS) as uint8 tensors on the CPU (treat them as read-only)."""
    name = name.replace("-", "_").lower()
    if name not in DATASETS:
        raise UsageError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}{did_you_mean(name, DATASETS)}")
    root = data_root(data_dir)
    folder = next((d for d in _candidate_dirs(name, root) if _present(name, d)), None)
    if folder is None:
        if not download_missing:
            raise _missing_error(name, root, "download is off")
        try:
            download(name, root)
        except Exception as e:  # network down, proxy, bad checksum ...
            reason = str(e).replace("\n", " ")
            raise _missing_error(name, root, f"download failed: {e.__class__.__name__}: {reason}") from e
        folder = next((d for d in _candidate_dirs(name, root) if _present(name, d)), None)
        if folder is None:
            raise _missing_error(name, root, "downloaded, but the expected files did not appear")
    key = (name, str(folder.resolve()))
    if key not in _CACHE:
        arrays = _LOADERS[name](folder, name) if name in ("mnist", "fashion_mnist") else _LOADERS[name](folder)
        _CACHE[key] = ImageData(
            name,
            torch.from_numpy(np.ascontiguousarray(arrays["train_x"])),
            torch.from_numpy(arrays["train_y"].astype(np.int64)),
            torch.from_numpy(np.ascontiguousarray(arrays["test_x"])),
            torch.from_numpy(arrays["test_y"].astype(np.int64)),
        )
    d = _CACHE[key]
    return ImageData(d.name, d.train_images, d.train_labels, d.test_images, d.test_labels, d.num_classes)


# ---------------------------------------------------------------- labeled subsets


def balanced_labeled_indices(labels: Sequence[int], num_labeled: int, num_classes: int, seed: int) -> np.ndarray:
    """``num_labeled / num_classes`` indices per class, the first ones of a seeded permutation; sorted."""
    labels = np.asarray(labels)
    if num_labeled <= 0 or num_labeled % num_classes:
        raise UsageError(f"num_labeled must be a positive multiple of num_classes={num_classes}, got {num_labeled}")
    per_class = num_labeled // num_classes
    perm = np.random.RandomState(seed).permutation(len(labels))
    chosen = []
    for c in range(num_classes):
        of_class = perm[labels[perm] == c][:per_class]
        if len(of_class) < per_class:
            raise UsageError(
                f"class {c} has only {len(of_class)} training examples, {per_class} labeled ones "
                f"requested; lower num_labeled or raise max_train_samples"
            )
        chosen.append(of_class)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def labeled_subset(
    labels: Sequence[int], num_labeled: int, num_classes: int, seed: int, path: Optional[Path] = None
) -> np.ndarray:
    """Like ``balanced_labeled_indices``, but reused from ``path`` (.npy) when it exists, saved there otherwise."""
    if path is not None and Path(path).exists():
        idx = np.load(path)
        if len(idx) != num_labeled:
            raise UsageError(
                f"{path} holds {len(idx)} labeled indices but num_labeled={num_labeled}; "
                f"delete it or use another run dir"
            )
        if len(idx) and not 0 <= int(idx.min()) <= int(idx.max()) < len(labels):
            raise UsageError(
                f"{path} holds labeled indices up to {int(idx.max())}, outside the {len(labels)} "
                f"training images (max_train_samples / val_samples changed?); delete it or use "
                f"another run dir"
            )
        return idx.astype(np.int64)
    idx = balanced_labeled_indices(labels, num_labeled, num_classes, seed)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp.npy")
        np.save(tmp, idx)
        os.replace(tmp, path)
    return idx


def unlabeled_pool(num_train: int, labeled_idx: np.ndarray, include_labeled: bool = False) -> np.ndarray:
    """Training indices used as unlabeled data: all but the labeled ones (DRMM code), or all (USB)."""
    if include_labeled:
        return np.arange(num_train, dtype=np.int64)
    mask = np.ones(num_train, dtype=bool)
    mask[labeled_idx] = False
    return np.nonzero(mask)[0].astype(np.int64)


# ---------------------------------------------------------------- augmentation


def augment(x: Tensor, generator: torch.Generator, crop_pad: int = 4, flip: bool = True) -> Tensor:
    """Random crop with ``crop_pad`` zero padding and random horizontal flip, vectorised over the batch."""
    n, _, h, w = x.shape
    dev = x.device
    if crop_pad:
        padded = torch.nn.functional.pad(x, (crop_pad,) * 4)
        oy = torch.randint(0, 2 * crop_pad + 1, (n,), generator=generator).to(dev)
        ox = torch.randint(0, 2 * crop_pad + 1, (n,), generator=generator).to(dev)
        rows = (oy.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * crop_pad)
        padded = padded.gather(2, rows)
        cols = (ox.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        x = padded.gather(3, cols)
    if flip:
        do_flip = (torch.rand(n, generator=generator) < 0.5).to(dev).view(n, 1, 1, 1)
        x = torch.where(do_flip, x.flip(3), x)
    return x


__all__ = [
    "DATASETS",
    "ImageData",
    "DataNotFoundError",
    "CorruptDataError",
    "DOWNLOAD_TIMEOUT_S",
    "load_dataset",
    "read_idx",
    "download",
    "balanced_labeled_indices",
    "labeled_subset",
    "unlabeled_pool",
    "augment",
    "data_root",
]
