"""Tests for :mod:`helpers.data`: the checksum-verified MNIST loader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from helpers import data
from helpers.data import DataIntegrityError, array_digest, load_mnist

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    """The uint8 arrays of the committed ``data/mnist.npz``."""
    with np.load(data.DEFAULT_PATH, allow_pickle=False) as archive:
        return {key: archive[key] for key in data.MNIST_SHAPES}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` as an uncompressed npz at ``path``."""
    with path.open("wb") as file:
        np.savez(file, **arrays)
    return path


def _raises_integrity(path: Path, *fragments: str) -> DataIntegrityError:
    """Assert that loading ``path`` raises DataIntegrityError naming it and ``fragments``."""
    with pytest.raises(DataIntegrityError) as info:
        load_mnist(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return info.value


# --------------------------------------------------------------------------- the real file


def test_real_file_shapes_dtypes_ranges() -> None:
    (x_train, y_train), (x_test, y_test) = load_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert np.bincount(y_train).tolist() == TRAIN_COUNTS
    assert np.bincount(y_test).tolist() == TEST_COUNTS


def test_real_file_values_are_uint8_over_255(raw: dict[str, np.ndarray]) -> None:
    (x_train, y_train), (x_test, y_test) = load_mnist()
    np.testing.assert_array_equal(x_test, raw["x_test"].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y_train, raw["y_train"])
    np.testing.assert_array_equal(y_test, raw["y_test"])
    assert np.array_equal(x_train[0] * 255, raw["x_train"][0].astype(np.float32))


def test_explicit_default_path_matches_none() -> None:
    (a, _), _ = load_mnist()
    (b, _), _ = load_mnist(str(data.DEFAULT_PATH))
    np.testing.assert_array_equal(a, b)


def test_returned_arrays_are_fresh_copies() -> None:
    (x_train, y_train), _ = load_mnist()
    x_train[0] = 7.0
    y_train[0] = 3
    (again, labels), _ = load_mnist()
    assert again[0].max() <= 1.0
    assert labels[0] == 5  # the first MNIST training digit is a 5


# --------------------------------------------------------------------------- corrupt files


def test_flipped_pixel(tmp_path: Path, raw: dict[str, np.ndarray]) -> None:
    x_train = raw["x_train"].copy()
    x_train[123, 14, 14] ^= 1
    path = _save(tmp_path / "flipped.npz", {**raw, "x_train": x_train})
    _raises_integrity(path, "x_train: SHA-256", data.MNIST_SHA256["x_train"])


def test_flipped_label(tmp_path: Path, raw: dict[str, np.ndarray]) -> None:
    y_test = raw["y_test"].copy()
    y_test[0] = (y_test[0] + 1) % 10
    path = _save(tmp_path / "label.npz", {**raw, "y_test": y_test})
    error = _raises_integrity(path, "y_test: SHA-256")
    assert "x_train" not in str(error)  # only the array that differs is named


def test_missing_key(tmp_path: Path, raw: dict[str, np.ndarray]) -> None:
    arrays = {k: v for k, v in raw.items() if k != "y_test"}
    path = _save(tmp_path / "missing.npz", arrays)
    _raises_integrity(path, "y_test: missing")


def test_wrong_dtype(tmp_path: Path, raw: dict[str, np.ndarray]) -> None:
    path = _save(tmp_path / "dtype.npz", {**raw, "y_train": raw["y_train"].astype(np.int64)})
    _raises_integrity(path, "y_train: dtype int64", "uint8")


def test_wrong_shape(tmp_path: Path, raw: dict[str, np.ndarray]) -> None:
    path = _save(tmp_path / "shape.npz", {**raw, "x_test": raw["x_test"].reshape(10000, 784)})
    _raises_integrity(path, "x_test: shape (10000, 784)", "(10000, 28, 28)")


def test_truncated_file(tmp_path: Path) -> None:
    content = Path(data.DEFAULT_PATH).read_bytes()
    path = tmp_path / "truncated.npz"
    path.write_bytes(content[: len(content) // 2])
    _raises_integrity(path, "unreadable")


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not an npz archive\n" * 100)
    _raises_integrity(path, "unreadable")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    _raises_integrity(path, "unreadable")


def test_object_array_is_refused(tmp_path: Path, raw: dict[str, np.ndarray]) -> None:
    labels = np.empty(10000, dtype=object)
    labels[:] = raw["y_test"].tolist()
    path = _save(tmp_path / "object.npz", {**raw, "y_test": labels})  # pickled by np.savez
    _raises_integrity(path, "unreadable array")


def test_single_npy_file(tmp_path: Path, raw: dict[str, np.ndarray]) -> None:
    path = tmp_path / "array.npy"
    np.save(path, raw["y_test"])
    _raises_integrity(path, "not an npz archive")


def test_integrity_error_is_a_value_error() -> None:
    assert issubclass(DataIntegrityError, ValueError)


def test_file_changed_after_first_load_is_rechecked(
    tmp_path: Path, raw: dict[str, np.ndarray]
) -> None:
    path = _save(tmp_path / "mnist.npz", raw)
    (_, y_train), _ = load_mnist(path)
    assert np.bincount(y_train).tolist() == TRAIN_COUNTS
    x_train = raw["x_train"].copy()
    x_train[0, 0, 0] = 255
    _save(path, {**raw, "x_train": x_train})  # same size: only the mtime tells them apart
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _raises_integrity(path, "x_train: SHA-256")


# --------------------------------------------------------------------------- missing files


def test_missing_explicit_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "mnist.npz"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mnist(path)


def test_fallback_to_keras_when_default_absent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, raw: dict[str, np.ndarray]
) -> None:
    calls: list[int] = []

    def fake_fetch() -> dict[str, np.ndarray]:
        calls.append(1)
        return dict(raw)

    monkeypatch.setattr(data, "DEFAULT_PATH", tmp_path / "absent.npz")
    monkeypatch.setattr(data, "fetch_mnist_from_keras", fake_fetch)
    (x_train, y_train), (x_test, y_test) = load_mnist()
    assert calls == [1]
    assert x_train.dtype == np.float32 and y_test.dtype == np.int64
    assert np.bincount(y_train).tolist() == TRAIN_COUNTS
    np.testing.assert_array_equal(x_test * 255, raw["x_test"].astype(np.float32))


def test_fallback_is_verified_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, raw: dict[str, np.ndarray]
) -> None:
    y_train = raw["y_train"].copy()
    y_train[-1] = (y_train[-1] + 1) % 10
    monkeypatch.setattr(data, "DEFAULT_PATH", tmp_path / "absent.npz")
    monkeypatch.setattr(data, "fetch_mnist_from_keras", lambda: {**raw, "y_train": y_train})
    with pytest.raises(DataIntegrityError, match=r"keras.*y_train: SHA-256"):
        load_mnist()


def test_present_default_file_does_not_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fetch() -> dict[str, np.ndarray]:
        raise AssertionError("the keras fallback must not run when data/mnist.npz exists")

    monkeypatch.setattr(data, "fetch_mnist_from_keras", no_fetch)
    (x_train, _), _ = load_mnist()
    assert x_train.shape == (60000, 28, 28)


# --------------------------------------------------------------------------- digests


def test_checksum_constants_match_array_hashes(raw: dict[str, np.ndarray]) -> None:
    import hashlib

    for key, array in raw.items():
        assert hashlib.sha256(array.tobytes()).hexdigest() == data.MNIST_SHA256[key]


def test_array_digest() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert array_digest(a) == array_digest(a.copy())
    assert len(array_digest(a)) == 64
    assert array_digest(a) != array_digest(a.reshape(4, 3))  # shape
    assert array_digest(a) != array_digest(a.astype(np.float64))  # dtype
    b = a.copy()
    b[1, 1] += 1
    assert array_digest(a) != array_digest(b)  # content
    assert array_digest(a, b) != array_digest(b, a)  # order
    assert array_digest(a.T) == array_digest(np.ascontiguousarray(a.T))  # layout-independent
    assert array_digest(a) != array_digest(a, a[:0])
