"""Data loaders (MNIST from DRMM_DATA_DIR; CIFAR-10 / SVHN on small files written here), labeled subsets."""

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from drmm import data as D
from drmm_cases import DATA_DIR, needs_mnist


@needs_mnist
def test_mnist_counts_and_label_histogram():
    d = D.load_dataset("mnist", DATA_DIR)
    assert d.train_images.shape == (60000, 1, 28, 28) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    x = d.normalize(d.train_images[:5])
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5


@needs_mnist
def test_fashion_mnist_loads():
    d = D.load_dataset("fashion-mnist", DATA_DIR)
    assert d.train_images.shape == (60000, 1, 28, 28) and len(d.test_labels) == 10000
    assert torch.bincount(d.train_labels).tolist() == [6000] * 10


def _write_idx(path: Path, arr: np.ndarray):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_checks_counts_and_size(tmp_path):
    arr = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(D.read_idx(tmp_path / "a.gz", 3), arr)
    with pytest.raises(ValueError, match="holds 3 items, expected 60000"):
        D.read_idx(tmp_path / "a.gz", 60000)
    with gzip.open(tmp_path / "b.gz", "wb") as f:  # header says 3 images but only 2 are there
        f.write(bytes([0, 0, 8, 3]) + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(2 * 784))
    with pytest.raises(ValueError, match="does not match its header"):
        D.read_idx(tmp_path / "b.gz")
    (tmp_path / "c").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(tmp_path / "c")


def test_missing_data_error_names_files_and_both_ways(tmp_path):
    with pytest.raises(D.DataNotFoundError) as e:
        D.load_dataset("mnist", str(tmp_path), download_missing=False)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "DRMM_DATA_DIR" in msg and "--data-dir" in msg and "download" in msg
    with pytest.raises(D.DataNotFoundError, match="cifar-10-batches-py/data_batch_1"):
        D.load_dataset("cifar10", str(tmp_path))
    with pytest.raises(ValueError, match="dataset must be one of"):
        D.load_dataset("imagenet", str(tmp_path))


def _write_cifar(folder: Path, n: int, seed: int):
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = list(rng.randint(0, 10, size=n))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        batches[name] = (data, labels)
    return batches


def test_cifar10_loader_on_small_files(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", n=7, seed=0)
    d = D.load_dataset("cifar10", str(tmp_path))
    assert d.train_images.shape == (35, 3, 32, 32) and d.test_images.shape == (7, 3, 32, 32)
    data2, labels2 = batches["data_batch_2"]
    # rows are R(1024) G(1024) B(1024), each row-major 32x32
    assert torch.equal(d.train_images[7, 1], torch.from_numpy(data2[0, 1024:2048].reshape(32, 32)))
    assert d.train_labels[7:14].tolist() == [int(v) for v in labels2]
    x = d.normalize(d.train_images[:2])
    assert x.shape == (2, 3, 32, 32) and x.mean().abs() < 2.0  # per-channel standardised


def test_cifar10_loader_rejects_malformed_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, n=3, seed=1)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(ValueError, match="3072"):
        D.load_dataset("cifar10", str(tmp_path))


def test_svhn_loader_on_small_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.RandomState(0)
    (tmp_path / "svhn").mkdir()
    for name, n in (("train", 6), ("test", 4)):
        X = rng.randint(0, 256, size=(32, 32, 3, n)).astype(np.uint8)
        y = np.array([[10], [1], [2], [3], [9], [10]][:n], dtype=np.uint8)
        savemat(tmp_path / "svhn" / f"{name}_32x32.mat", {"X": X, "y": y})
        if name == "train":
            X_train = X
    d = D.load_dataset("svhn", str(tmp_path))
    assert d.train_images.shape == (6, 3, 32, 32) and d.test_images.shape == (4, 3, 32, 32)
    assert d.train_labels.tolist() == [0, 1, 2, 3, 9, 0]  # label 10 is the digit 0
    assert torch.equal(d.train_images[2, 0], torch.from_numpy(X_train[:, :, 0, 2]))


def test_download_verifies_md5(tmp_path, monkeypatch):
    src = tmp_path / "server"
    src.mkdir()
    payload = b"not really an svhn file"
    for name in ("train_32x32.mat", "test_32x32.mat"):
        (src / name).write_bytes(payload)
    good = hashlib.md5(payload).hexdigest()
    url = src.as_uri() + "/"
    monkeypatch.setitem(D._DOWNLOADS, "svhn", (url, {"train_32x32.mat": good, "test_32x32.mat": good}))
    target = D.download("svhn", tmp_path / "root")
    assert (target / "train_32x32.mat").read_bytes() == payload
    monkeypatch.setitem(D._DOWNLOADS, "svhn", (url, {"train_32x32.mat": "0" * 32}))
    with pytest.raises(IOError, match="md5"):
        D.download("svhn", tmp_path / "root2")
    assert not (tmp_path / "root2" / "svhn" / "train_32x32.mat").exists()


def test_labeled_subset_balanced_reproducible_and_saved(tmp_path):
    labels = np.random.RandomState(0).randint(0, 10, size=5000)
    a = D.balanced_labeled_indices(labels, 100, 10, seed=3)
    b = D.balanced_labeled_indices(labels, 100, 10, seed=3)
    c = D.balanced_labeled_indices(labels, 100, 10, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(labels[a], minlength=10).tolist() == [10] * 10
    assert len(np.unique(a)) == 100
    path = tmp_path / "labeled_indices.npy"
    saved = D.labeled_subset(labels, 100, 10, 3, path)
    assert path.exists() and np.array_equal(np.load(path), saved)
    # reused on resume even if the seed argument changed
    assert np.array_equal(D.labeled_subset(labels, 100, 10, 99, path), saved)
    with pytest.raises(ValueError, match="num_labeled"):
        D.labeled_subset(labels, 50, 10, 3, path)
    with pytest.raises(ValueError, match="multiple of num_classes"):
        D.balanced_labeled_indices(labels, 105, 10, 0)
    pool = D.unlabeled_pool(5000, a)
    assert len(pool) == 4900 and not np.isin(a, pool).any()
    assert len(D.unlabeled_pool(5000, a, include_labeled=True)) == 5000


def test_augment_is_seeded_and_keeps_shape():
    x = torch.rand(4, 3, 8, 8)
    a = D.augment(x, torch.Generator().manual_seed(0), crop_pad=2)
    b = D.augment(x, torch.Generator().manual_seed(0), crop_pad=2)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    same = D.augment(x, torch.Generator().manual_seed(0), crop_pad=0, flip=False)
    assert torch.equal(same, x)


def test_cifar10_download_extracts_archive_and_loads(tmp_path, monkeypatch):
    import tarfile

    _write_cifar(tmp_path / "src" / "cifar-10-batches-py", n=2, seed=2)
    server = tmp_path / "server"
    server.mkdir()
    archive = server / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(D._DOWNLOADS, "cifar10", (server.as_uri() + "/", {"cifar-10-python.tar.gz": md5}))
    d = D.load_dataset("cifar10", str(tmp_path / "root"), download_missing=True)
    assert d.train_images.shape == (10, 3, 32, 32) and (tmp_path / "root" / "cifar-10-batches-py").is_dir()


def test_idx_reader_names_a_truncated_or_foreign_file(tmp_path):
    raw = bytes([0, 0, 8, 3]) + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    raw += np.random.RandomState(0).randint(0, 256, 3 * 784).astype(np.uint8).tobytes()
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(raw)
    data = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "a.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(D.CorruptDataError, match=r"a\.gz: truncated or corrupt gzip file .*download it again"):
        D.read_idx(tmp_path / "a.gz")
    (tmp_path / "b.gz").write_bytes(b"<html>404</html>")  # what a proxy may serve instead of the archive
    with pytest.raises(D.CorruptDataError, match=r"b\.gz: truncated or corrupt gzip"):
        D.read_idx(tmp_path / "b.gz")
    (tmp_path / "c").write_bytes(raw[:-10])  # uncompressed, cut short
    with pytest.raises(D.CorruptDataError, match="does not match its header"):
        D.read_idx(tmp_path / "c", fix="replace it")


def test_truncated_cifar_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, n=3, seed=2)
    data = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(data[:100])
    with pytest.raises(D.CorruptDataError, match=r"data_batch_3: truncated or corrupt CIFAR-10 batch .*md5"):
        D.load_dataset("cifar10", str(tmp_path))


def test_unreachable_host_fails_within_the_timeout(monkeypatch):
    """A name lookup that hangs (no network, no DNS answer) must not block the download for minutes."""
    import socket
    import time

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(3))
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="no network"):
        D._check_reachable("https://example.invalid/x.gz", timeout=0.3)
    assert time.perf_counter() - t0 < 5
    D._check_reachable((Path("/") / "x").as_uri(), timeout=0.3)  # file:// URLs need no lookup
