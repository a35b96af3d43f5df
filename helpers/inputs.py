"""Validate ``(x, y)`` against a model and cut it into batches of tensors.

Arrays are checked up front (shapes, dtypes, label range, finite values, not empty) so that a
mistake raises a ``ValueError`` naming it, then sliced batch by batch (memory does not grow with
the data set). A ``tf.data.Dataset`` of ``(x, y)`` batches is checked from its ``element_spec``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from helpers.losses import LossName
from helpers.network import Chain
from helpers.runtime import tf

Data = np.ndarray | tf.data.Dataset


def label_spec(chain: Chain, loss: LossName) -> tf.TensorSpec:
    if loss == "softmax_cross_entropy":
        return tf.TensorSpec([None], tf.int32)
    return tf.TensorSpec([None, chain.num_outputs], chain.dtype)


def check_arrays(
    chain: Chain, x: object, y: object, loss: LossName
) -> tuple[np.ndarray, np.ndarray]:
    if y is None:
        raise ValueError(
            "y is required when x is an array (pass a tf.data.Dataset of (x, y) batches otherwise)"
        )
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[1:] != chain.input_shape:
        raise ValueError(
            f"x has shape {x.shape}; model {chain.model.name!r} expects (N, {', '.join(map(str, chain.input_shape))})"
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"x must be real numbers, got dtype {x.dtype}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("x is empty: second derivatives of a mean over zero samples are undefined")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or infinite values")
    y = np.asarray(y)
    if loss == "softmax_cross_entropy":
        if y.shape != (n,):
            raise ValueError(
                f"labels y have shape {y.shape}; expected ({n},) integer class indices"
                + (" (one-hot labels? pass y.argmax(axis=1))" if y.ndim == 2 else "")
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels y must be integers, got dtype {y.dtype}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= chain.num_outputs:
            raise ValueError(
                f"labels y range over [{lo}, {hi}]; model {chain.model.name!r} has "
                f"{chain.num_outputs} classes, so labels must be in [0, {chain.num_outputs - 1}]"
            )
    else:
        if chain.num_outputs == 1 and y.shape == (n,):
            y = y.reshape(n, 1)
        if y.shape != (n, chain.num_outputs):
            raise ValueError(f"targets y have shape {y.shape}; expected ({n}, {chain.num_outputs})")
        if not np.all(np.isfinite(y)):
            raise ValueError("targets y contain NaN or infinite values")
    return x, y


def _check_dataset(chain: Chain, dataset: tf.data.Dataset, loss: LossName) -> None:
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise ValueError("the dataset must yield (x, y) pairs of batches")
    x_spec, y_spec = spec
    if tuple(x_spec.shape[1:]) != chain.input_shape:
        raise ValueError(
            f"dataset batches x have shape {tuple(x_spec.shape)}; model {chain.model.name!r} expects "
            f"(batch, {', '.join(map(str, chain.input_shape))}); is the dataset batched?"
        )
    want = 1 if loss == "softmax_cross_entropy" else 2
    if y_spec.shape.rank != want:
        raise ValueError(
            f"dataset batches y have shape {tuple(y_spec.shape)}; expected rank {want}"
        )
    if loss == "softmax_cross_entropy" and not y_spec.dtype.is_integer:
        raise ValueError(f"dataset labels must be integers, got {y_spec.dtype.name}")


def batches(
    chain: Chain, x: Data, y: object, loss: LossName, batch_size: int
) -> tuple[Iterator[tuple[tf.Tensor, tf.Tensor]], int | None]:
    """Validated (x, y) tensor batches, and the number of batches when it is known."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    label_dtype = label_spec(chain, loss).dtype
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("y must be None when x is a tf.data.Dataset of (x, y) batches")
        _check_dataset(chain, x, loss)
        cardinality = int(x.cardinality())
        count = cardinality if cardinality >= 0 else None

        def from_dataset() -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
            for xb, yb in x:
                yield tf.cast(xb, chain.dtype), tf.cast(yb, label_dtype)

        return from_dataset(), count
    xa, ya = check_arrays(chain, x, y, loss)
    n = xa.shape[0]

    def from_arrays() -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        for start in range(0, n, batch_size):
            stop = start + batch_size
            yield (
                tf.constant(xa[start:stop], dtype=chain.dtype),
                tf.constant(ya[start:stop], dtype=label_dtype),
            )

    return from_arrays(), math.ceil(n / batch_size)


def progress_bar(iterable: Iterator, total: int | None, show: bool, desc: str) -> Iterator:
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")


__all__ = ["Data", "batches", "label_spec", "progress_bar"]
