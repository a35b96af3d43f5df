"""The MNIST arrays, checksum-verified.

:func:`load_mnist` reads ``data/mnist.npz`` (committed to the repository), checks every array
against a known SHA-256 and returns float32 images in ``[0, 1]`` with int64 labels. If that file
is absent it falls back to :func:`keras.datasets.mnist.load_data` (a download, or Keras's own
cache) and checks the same checksums, so every notebook sees byte-for-byte the same data.

:func:`array_digest` hashes arrays (dtype, shape and bytes); :mod:`helpers.models` uses it to
key its cache of trained weights by the data they were trained on.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

#: ``<repository root>/data/mnist.npz``; read at call time, so tests may monkeypatch it.
DEFAULT_PATH: Path = Path(__file__).resolve().parent.parent / "data" / "mnist.npz"

#: Expected shape of each uint8 array in the archive.
MNIST_SHAPES: dict[str, tuple[int, ...]] = {
    "x_train": (60000, 28, 28),
    "y_train": (60000,),
    "x_test": (10000, 28, 28),
    "y_test": (10000,),
}

#: SHA-256 of ``array.tobytes()`` for each uint8 array, as published by Keras's ``mnist.npz``.
MNIST_SHA256: dict[str, str] = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}

MnistArrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

# Verified uint8 arrays of the last file read, keyed by (resolved path, mtime_ns, size).
_VERIFIED: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}
_VERIFIED_LOCK = threading.Lock()


class DataIntegrityError(ValueError):
    """The MNIST file is unreadable or its arrays differ from the expected ones."""


def _buffer(array: np.ndarray) -> memoryview | bytes:
    """The bytes of ``array`` in C order, without a copy when the array allows it."""
    a = np.ascontiguousarray(array)
    try:
        return memoryview(a.reshape(-1)).cast("B")
    except (TypeError, ValueError):  # dtypes without a buffer format (datetime, ...)
        return a.tobytes()


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 hex digest over the arrays' dtypes, shapes and bytes, in order.

    Two calls agree exactly when the arrays have the same dtypes, shapes and contents, so the
    digest can key a cache by data (e.g. trained weights by the training set).
    """
    h = hashlib.sha256()
    h.update(f"array_digest/v1:{len(arrays)};".encode())
    for array in arrays:
        a = np.asarray(array)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(_buffer(a))
    return h.hexdigest()


def _sha256(array: np.ndarray) -> str:
    """SHA-256 of ``array.tobytes()``."""
    return hashlib.sha256(_buffer(array)).hexdigest()


def _verify(arrays: Mapping[str, object], source: str) -> dict[str, np.ndarray]:
    """Check the four MNIST arrays' presence, dtype, shape and SHA-256; return them.

    Raises :class:`DataIntegrityError` naming ``source`` and every difference found.
    """
    problems: list[str] = []
    checked: dict[str, np.ndarray] = {}
    for key, shape in MNIST_SHAPES.items():
        if key not in arrays:
            problems.append(f"{key}: missing (found keys {sorted(arrays)})")
            continue
        array = arrays[key]
        if not isinstance(array, np.ndarray):
            problems.append(f"{key}: not an array ({type(array).__name__})")
        elif array.dtype != np.uint8:
            problems.append(f"{key}: dtype {array.dtype} != expected uint8")
        elif array.shape != shape:
            problems.append(f"{key}: shape {array.shape} != expected {shape}")
        else:
            digest = _sha256(array)
            if digest != MNIST_SHA256[key]:
                problems.append(f"{key}: SHA-256 {digest} != expected {MNIST_SHA256[key]}")
            else:
                checked[key] = array
    if problems:
        raise DataIntegrityError(f"{source}: " + "; ".join(problems))
    return checked


def _read_npz(path: Path) -> dict[str, object]:
    """Read the four MNIST arrays of an ``.npz`` file (no pickles); absent keys are left out.

    Raises :class:`DataIntegrityError` if the file is not a readable npz archive.
    """
    # Open the file here, not in np.load: np.load leaks its handle when the zip is corrupt.
    with path.open("rb") as file:
        try:
            archive = np.load(file, allow_pickle=False)
        except Exception as error:  # garbage bytes (refused as a pickle), truncated zip, ...
            raise DataIntegrityError(
                f"{path}: unreadable as an npz archive ({type(error).__name__}: {error})"
            ) from error
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataIntegrityError(f"{path}: not an npz archive (a single .npy array?)")
        with archive:
            try:
                return {key: archive[key] for key in MNIST_SHAPES if key in archive.files}
            except Exception as error:  # object arrays, corrupt members (zlib.error), ...
                raise DataIntegrityError(
                    f"{path}: unreadable array in the npz archive ({type(error).__name__}: {error})"
                ) from error


def _load_verified_file(path: Path) -> dict[str, np.ndarray]:
    """The verified uint8 arrays of ``path``, re-hashed only when the file changed."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _VERIFIED_LOCK:
        cached = _VERIFIED.get(key)
    if cached is not None:
        return cached
    arrays = _verify(_read_npz(path), str(path))
    for array in arrays.values():
        array.setflags(write=False)  # shared between calls: nobody may modify it
    with _VERIFIED_LOCK:
        _VERIFIED.clear()  # keep one file's arrays (about 55 MB), not every file ever read
        _VERIFIED[key] = arrays
    return arrays


def fetch_mnist_from_keras() -> dict[str, np.ndarray]:
    """The uint8 MNIST arrays from :func:`keras.datasets.mnist.load_data` (may download).

    Isolated in one function so tests can replace it (no network in tests).
    """
    from helpers.runtime import keras

    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _to_float(arrays: Mapping[str, np.ndarray]) -> MnistArrays:
    """Images as float32 in [0, 1], labels as int64 (fresh, writable copies)."""

    def images(key: str) -> np.ndarray:
        x = arrays[key].astype(np.float32)
        x /= np.float32(255.0)  # in place: one 188 MB allocation, not two
        return x

    def labels(key: str) -> np.ndarray:
        return arrays[key].astype(np.int64)

    return (images("x_train"), labels("y_train")), (images("x_test"), labels("y_test"))


def load_mnist(path: str | os.PathLike[str] | None = None) -> MnistArrays:
    """Load MNIST as ``(x_train, y_train), (x_test, y_test)``, checksum-verified.

    Images are float32 in ``[0, 1]`` (uint8 / 255) with shape ``(N, 28, 28)``; labels are int64
    with shape ``(N,)``; N is 60,000 for training and 10,000 for test. Each call returns fresh
    arrays, which the caller may modify.

    Args:
        path: an ``.npz`` file with uint8 arrays ``x_train``, ``y_train``, ``x_test``,
            ``y_test``. ``None`` reads :data:`DEFAULT_PATH` (``<repo>/data/mnist.npz``) or, if
            that file is absent, falls back to :func:`keras.datasets.mnist.load_data`.

    Raises:
        FileNotFoundError: ``path`` was given and does not exist.
        DataIntegrityError: the file is unreadable, or an array is missing or differs in dtype,
            shape or SHA-256 from the expected MNIST arrays.
    """
    if path is None:
        default = Path(DEFAULT_PATH)
        if default.is_file():
            return _to_float(_load_verified_file(default))
        return _to_float(_verify(fetch_mnist_from_keras(), "keras.datasets.mnist.load_data()"))
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"MNIST file not found: {file}")
    return _to_float(_load_verified_file(file))


__all__ = [
    "DEFAULT_PATH",
    "MNIST_SHA256",
    "MNIST_SHAPES",
    "DataIntegrityError",
    "array_digest",
    "fetch_mnist_from_keras",
    "load_mnist",
]
