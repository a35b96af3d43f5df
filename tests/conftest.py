"""Shared fixtures: tiny seeded Keras networks and data for the unit tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

# In the suite's two worker processes (pytest-xdist), TensorFlow runs independent ops one at a
# time: the two workers, and the notebook kernels they start (which inherit this environment),
# share two cores; the same numbers, and two processes side by side were faster with one
# inter-op thread each (helpers.runtime). Set before helpers.runtime is imported; an explicit
# setting is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OBD_INTER_OP_THREADS", "1")

# The numeric environment of the suite (oneDNN off) is set by the repository's root conftest.py,
# which pytest loads first.
from helpers.runtime import keras, set_determinism

# Order of the work for `--dist loadscope --no-loadscope-reorder` (pyproject.toml): a scope (a
# notebook or a test module) goes to whichever worker is free, in this order. The two notebooks
# that train the cached networks come first, one per worker, so no later notebook waits for a
# network another one is still training; then the other notebooks, longest first (chapter 08
# needs chapter 03's networks); the unit-test modules last, small pieces that fill both workers
# evenly at the end. Within a scope the order is the collection order (nbval runs the cells of a
# notebook in order).
SCHEDULE = (
    "notebooks/03_training.ipynb",
    "notebooks/10_convolutional_networks.ipynb",
    "notebooks/08_prune_retrain_repeat.ipynb",
    "notebooks/09_optimal_brain_surgeon.ipynb",
    "notebooks/11_which_hessian_approximation.ipynb",
    "notebooks/01_taylor_expansion_and_saliency.ipynb",
    "notebooks/06_dropout.ipynb",
    "notebooks/02_backpropagating_second_derivatives.ipynb",
    "notebooks/07_what_went_wrong_in_2016.ipynb",
    "notebooks/12_compression.ipynb",
    "notebooks/04_magnitude_vs_obd.ipynb",
    "notebooks/05_heavy_pruning.ipynb",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the notebooks in :data:`SCHEDULE` order (a notebook not listed after them) ahead of
    the unit tests; a stable sort, so the cells of a notebook and the tests of a module keep
    their order."""
    rank = {path: i for i, path in enumerate(SCHEDULE)}

    def key(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return rank.get(path, len(SCHEDULE) + (not path.startswith("notebooks/")))

    items.sort(key=key)


def make_mlp(
    n_in: int = 7,
    hidden: Sequence[int] = (6, 5),
    n_out: int = 4,
    *,
    activation: str = "relu",
    dtype: str = "float64",
    seed: int = 0,
    loss: str = "softmax_cross_entropy",
    dropout: float = 0.0,
) -> keras.Sequential:
    """A small dense chain with seeded random weights (biases non-zero so ReLU kinks are generic)."""
    set_determinism(seed)
    layers: list = [keras.Input((n_in,), dtype=dtype)]
    for width in hidden:
        layers.append(
            keras.layers.Dense(
                width, activation=activation, dtype=dtype, bias_initializer="random_normal"
            )
        )
        if dropout:
            layers.append(keras.layers.Dropout(dropout, dtype=dtype))
    layers.append(keras.layers.Dense(n_out, dtype=dtype, bias_initializer="random_normal"))
    model = keras.Sequential(layers, name="tiny")
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if loss == "softmax_cross_entropy"
        else keras.losses.MeanSquaredError()
    )
    return model


def run_fresh_python(
    script: str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """``python -c script`` in a fresh interpreter, from the repository root, with ``env`` added
    to this process's environment: for settings :mod:`helpers.runtime` reads only when
    TensorFlow starts, which this process has long done."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def fresh_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_fresh_python


@pytest.fixture
def mlp_factory() -> Callable[..., keras.Sequential]:
    return make_mlp


@pytest.fixture
def classification_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(37, 7)), rng.integers(0, 4, size=37)
